"""LoRA/QLoRA fine-tuning configuration (the document's ``FineTuneConfig``) over the YAML schema.

``FineTuneConfig.builder("model").method(FineTuneMethod.LoRA(lora)).learning_rate(1e-4).build()``
fills the same pydantic sections ``entrenar finetune`` reads (defaults included), and
``estimate_memory`` runs the estimator ``entrenar estimate`` uses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from entrenar_cli.config.schema import (
    DatasetSettings,
    FineTuneYamlConfig,
    LoRASettings,
    ModelSource,
    QuantizationSettings,
    TrainingSettings,
)
from entrenar_cli.errors import UsageError
from entrenar_cli.hf_pipeline._api import config_error, python_errors, schema_default, set_field


class MixedPrecision(str, enum.Enum):
    """Training precision (``training.mixed_precision``)."""

    Auto = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    AUTO = "auto"
    Fp32 = "fp32"
    Bf16 = "bf16"
    Fp16 = "fp16"


class LoRAConfig(LoRASettings):
    """LoRA settings: the schema's ``lora`` section (defaults and validation from there)."""

    @staticmethod
    def builder() -> "LoRAConfigBuilder":
        return LoRAConfigBuilder()

    @classmethod
    def new(cls, **kwargs: Any) -> "LoRAConfig":
        return cls(**kwargs)


class LoRAConfigBuilder:
    """``LoRAConfig.builder().rank(64).alpha(16.0).target_modules([...]).dropout(0.1).build()``."""

    def __init__(self) -> None:
        self._cfg = LoRAConfig()

    def _set(self, name: str, value: Any) -> "LoRAConfigBuilder":
        set_field(self._cfg, name, value, f"LoRAConfig.builder().{name}({value!r})")
        return self

    def rank(self, r: int) -> "LoRAConfigBuilder":
        return self._set("rank", r)

    def alpha(self, a: float) -> "LoRAConfigBuilder":
        return self._set("alpha", a)

    def target_modules(self, modules: list[str] | str) -> "LoRAConfigBuilder":
        return self._set("target_modules", modules if isinstance(modules, str) else list(modules))

    def dropout(self, p: float) -> "LoRAConfigBuilder":
        return self._set("dropout", p)

    def build(self) -> LoRAConfig:
        return self._cfg.model_copy()


@dataclass(frozen=True)
class FineTuneMethod:
    """``FineTuneMethod.Full``, ``FineTuneMethod.LoRA(lora)`` or ``FineTuneMethod.QLoRA(lora_config=lora, bits=4)``."""

    kind: str
    lora: LoRASettings | None = None
    bits: int | None = None

    @staticmethod
    def LoRA(lora_config: LoRASettings | None = None) -> "FineTuneMethod":  # noqa: N802 - the document's name
        return FineTuneMethod("lora", lora_config or LoRAConfig())

    @staticmethod
    def QLoRA(lora_config: LoRASettings | None = None, bits: int | None = None) -> "FineTuneMethod":  # noqa: N802
        quant = QuantizationSettings()
        if bits is not None:
            set_field(quant, "bits", bits, f"FineTuneMethod.QLoRA(bits={bits!r})")
        return FineTuneMethod("qlora", lora_config or LoRAConfig(), quant.bits)


FineTuneMethod.Full = FineTuneMethod("full")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class MemoryRequirement:
    """What ``FineTuneConfig.estimate_memory`` answers (bytes)."""

    total_bytes: int
    full_finetune_bytes: int  # the same run as full fine-tuning, for comparison
    savings_percent: float
    estimate: Any  # entrenar_cli.estimate.training.TrainingEstimate
    reference_model: str | None = None  # the catalogue model used when only a parameter count was given


class FineTuneConfig:
    """A fine-tuning run's sections (model, method, lora, quantization, training) and its memory estimate."""

    def __init__(self, model_id: str) -> None:
        try:
            self.model = ModelSource(model_id=model_id)
        except ValidationError as exc:
            raise config_error(exc, f"FineTuneConfig({model_id!r})") from None
        self.method = _method_from_schema()
        self.training = TrainingSettings()
        self.seq_len = schema_default(DatasetSettings, "max_length")

    @staticmethod
    def builder(model_id: str) -> "FineTuneConfigBuilder":
        return FineTuneConfigBuilder(model_id)

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def learning_rate(self) -> float:
        return self.training.learning_rate

    @property
    def mixed_precision(self) -> MixedPrecision:
        return MixedPrecision(self.training.mixed_precision)

    @property
    def batch_size(self) -> int:
        return self.training.batch_size

    def _estimate_kwargs(self) -> dict[str, Any]:
        lora = self.method.lora or LoRASettings()
        precision = self.training.mixed_precision
        return {
            "method": self.method.kind,
            "rank": lora.rank,
            "target_modules": lora.target_modules,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "batch_size": self.training.batch_size,
            "seq_len": self.seq_len,
            # auto is bf16 on the GPUs a run is planned for (CUDA Ampere+); the estimate is for CUDA
            "dtype": "bf16" if precision == "auto" else precision,
            "gradient_checkpointing": self.training.gradient_checkpointing,
            "gradient_accumulation": self.training.gradient_accumulation,
        }

    @python_errors
    def estimate_memory(self, model: int | dict[str, Any] | None = None) -> MemoryRequirement:
        """Peak training memory of this run.

        ``model``: a config.json dict (exact), a parameter count (answered for the catalogue causal
        LM nearest in size, named in ``reference_model``), or None to resolve ``model_id``.
        """
        from entrenar_cli import estimate as estimator
        from entrenar_cli.estimate import catalogue

        if self.method.kind == "qlora" and self.method.bits != 4:
            raise UsageError(f"the memory estimate models QLoRA over 4-bit NF4 weights (bits={self.method.bits})",
                             hint="use FineTuneMethod.QLoRA(lora_config, bits=4) for the estimate")
        reference = None
        if model is None:
            config = estimator.resolve_model(self.model_id).config
        elif isinstance(model, dict):
            config = model
        else:
            params = int(model)
            if params <= 0:
                raise UsageError(f"estimate_memory({params}): the parameter count must be > 0")
            causal = [e for e in catalogue.CATALOGUE.values()
                      if e.config.get("architectures", [""])[0].endswith(("ForCausalLM", "LMHeadModel"))]
            entry = min(causal, key=lambda e: abs(e.parameters - params))
            config, reference = entry.config, entry.display_name
        kwargs = self._estimate_kwargs()
        est = estimator.estimate_training(config, **kwargs)
        full = est if est.method == "full" else estimator.estimate_training(config, **{**kwargs, "method": "full"})
        savings = 100.0 * (1 - est.total_bytes / full.total_bytes) if full.total_bytes else 0.0
        return MemoryRequirement(est.total_bytes, full.total_bytes, savings, est, reference)

    def to_yaml_config(self, *, dataset_path: str, output_dir: str) -> FineTuneYamlConfig:
        """The ``entrenar finetune`` configuration of this run (validated)."""
        data: dict[str, Any] = {
            "model": self.model.model_dump(),
            "method": self.method.kind,
            "training": self.training.model_dump(),
            "dataset": {"path": dataset_path, "max_length": self.seq_len},
            "output": {"dir": output_dir},
        }
        if self.method.lora is not None:
            data["lora"] = self.method.lora.model_dump()
        if self.method.bits is not None:
            data["quantization"] = {"bits": self.method.bits}
        try:
            return FineTuneYamlConfig.model_validate(data)
        except ValidationError as exc:
            raise config_error(exc, "FineTuneConfig.to_yaml_config") from None

    def __repr__(self) -> str:
        return (f"FineTuneConfig(model_id={self.model_id!r}, method={self.method.kind!r}, "
                f"learning_rate={self.learning_rate}, mixed_precision={self.training.mixed_precision!r})")


def _method_from_schema() -> FineTuneMethod:
    kind = schema_default(FineTuneYamlConfig, "method")
    if kind == "full":
        return FineTuneMethod.Full  # type: ignore[attr-defined]
    return FineTuneMethod.QLoRA() if kind == "qlora" else FineTuneMethod.LoRA()


class FineTuneConfigBuilder:
    """Fluent builder of :class:`FineTuneConfig`; every value is validated by the schema."""

    def __init__(self, model_id: str) -> None:
        self._cfg = FineTuneConfig(model_id)

    def method(self, method: FineTuneMethod) -> "FineTuneConfigBuilder":
        if not isinstance(method, FineTuneMethod):
            raise UsageError(f"FineTuneConfig.builder().method({method!r}): expected a FineTuneMethod",
                             hint="pass FineTuneMethod.Full, FineTuneMethod.LoRA(lora) or FineTuneMethod.QLoRA(lora)")
        self._cfg.method = method
        return self

    def _train(self, name: str, value: Any) -> "FineTuneConfigBuilder":
        set_field(self._cfg.training, name, value, f"FineTuneConfig.builder().{name}({value!r})")
        return self

    def learning_rate(self, lr: float) -> "FineTuneConfigBuilder":
        return self._train("learning_rate", lr)

    def mixed_precision(self, precision: MixedPrecision | str) -> "FineTuneConfigBuilder":
        return self._train("mixed_precision", precision.value if isinstance(precision, enum.Enum) else precision)

    def batch_size(self, n: int) -> "FineTuneConfigBuilder":
        return self._train("batch_size", n)

    def epochs(self, n: int) -> "FineTuneConfigBuilder":
        return self._train("epochs", n)

    def gradient_accumulation(self, n: int) -> "FineTuneConfigBuilder":
        return self._train("gradient_accumulation", n)

    def gradient_checkpointing(self, enabled: bool = True) -> "FineTuneConfigBuilder":
        return self._train("gradient_checkpointing", enabled)

    def ema_decay(self, value: float | None) -> "FineTuneConfigBuilder":
        """Evaluate and save an exponential moving average of the weights (``training.ema_decay``)."""
        return self._train("ema_decay", value)

    def seq_len(self, n: int) -> "FineTuneConfigBuilder":
        probe = DatasetSettings.model_construct(path="-")
        set_field(probe, "max_length", n, f"FineTuneConfig.builder().seq_len({n!r})")
        self._cfg.seq_len = probe.max_length
        return self

    def build(self) -> FineTuneConfig:
        return self._cfg


__all__ = ["FineTuneConfig", "FineTuneConfigBuilder", "FineTuneMethod", "LoRAConfig", "LoRAConfigBuilder",
           "MemoryRequirement", "MixedPrecision"]
