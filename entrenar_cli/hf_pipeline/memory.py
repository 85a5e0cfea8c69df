"""Weight memory before loading: the document's ``MemoryEstimate`` and ``Architecture``.

Computed by the estimator (:mod:`entrenar_cli.estimate`): exact module layouts for a config.json,
or a catalogue family scaled to a parameter count. ``entrenar estimate`` uses the same layouts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from entrenar_cli.errors import UsageError
from entrenar_cli.estimate import catalogue
from entrenar_cli.estimate.layout import shape_of
from entrenar_cli.estimate.training import weights_bytes_by_dtype
from entrenar_cli.hf_pipeline._api import python_errors


class Architecture(str, enum.Enum):
    """Catalogue families, for :meth:`MemoryEstimate.from_architecture` (both spellings)."""

    Llama = "llama"
    Llama3 = "llama3"
    Mistral = "mistral"
    Qwen2 = "qwen2.5"
    TinyLlama = "tinyllama"
    SmolLM2 = "smollm2"
    Gpt2 = "gpt2"
    Bert = "bert"
    Roberta = "roberta"
    CodeBert = "codebert"
    Phi2 = "phi2"
    LLAMA = "llama"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"
    QWEN2 = "qwen2.5"
    TINYLLAMA = "tinyllama"
    SMOLLM2 = "smollm2"
    GPT2 = "gpt2"
    BERT = "bert"
    ROBERTA = "roberta"
    CODEBERT = "codebert"
    PHI2 = "phi2"


def _layout(config: dict[str, Any]) -> Any:
    from entrenar_cli.estimate import layout_for

    return layout_for(config)


@dataclass(frozen=True)
class MemoryEstimate:
    """Weight memory of a model in each storage format (bytes).

    ``int4_bytes`` is NF4 as QLoRA stores it (4.127 bits per Linear weight including
    double-quantized constants; embeddings and lm_head stay 16-bit), not parameters / 2.
    """

    parameters: int
    fp32_bytes: int
    bf16_bytes: int
    fp16_bytes: int
    int8_bytes: int
    int4_bytes: int
    architecture: str = ""  # the model_type the sizes were computed for

    @classmethod
    @python_errors
    def from_config(cls, config: dict[str, Any]) -> "MemoryEstimate":
        """Exact, from a config.json dict."""
        layout = _layout(config)
        w = weights_bytes_by_dtype(layout)
        model_type = shape_of(config, layout).model_type
        return cls(layout.parameters, w["fp32"], w["bf16"], w["fp16"], w["int8"], w["nf4"], model_type)

    @classmethod
    @python_errors
    def from_architecture(cls, arch: "Architecture | str | dict[str, Any]", params: int | None = None
                          ) -> "MemoryEstimate":
        """From a config dict (exact; ``params`` ignored), or a catalogue family and a parameter count.

        For a family, the quantizable share of the parameters (Linear weights outside the head) is
        taken from the family's catalogue entry nearest in size, so int8/int4 keep embeddings 16-bit.
        """
        if isinstance(arch, dict):
            return cls.from_config(arch)
        family = catalogue.canonical_family(arch.value if isinstance(arch, Architecture) else str(arch))
        entries = [e for e in catalogue.CATALOGUE.values() if e.family == family]
        ref = min(entries, key=lambda e: abs(e.parameters - (params or e.parameters)))
        if params is None:
            return cls.from_config(ref.config)
        if params <= 0:
            raise UsageError(f"MemoryEstimate.from_architecture(params={params}): params must be > 0")
        layout = _layout(ref.config)
        q_weights = sum(m.weight_params for m in layout.quantizable_linears())
        q = int(params * q_weights / layout.parameters)
        rest = params - q
        mean_rows = sum(m.d_out for m in layout.quantizable_linears()) / max(q_weights, 1)
        return cls(
            parameters=params,
            fp32_bytes=4 * params,
            bf16_bytes=2 * params,
            fp16_bytes=2 * params,
            int8_bytes=2 * rest + q + int(4 * mean_rows * q),
            int4_bytes=2 * rest + int(q * (4 + 8 / 64 + 32 / (64 * 256)) / 8),
            architecture=str(ref.config.get("model_type", ref.family)),
        )

    def bytes_for(self, dtype: str) -> int:
        """Weight bytes in fp32 | bf16 | fp16 | int8 | int4 (nf4)."""
        key = {"nf4": "int4"}.get(dtype, dtype)
        if key not in ("fp32", "bf16", "fp16", "int8", "int4"):
            raise UsageError(f"unknown weight dtype {dtype!r}",
                             hint="pass dtype='fp32', 'bf16', 'fp16', 'int8' or 'int4'")
        return int(getattr(self, f"{key}_bytes"))

    def fits_in(self, budget_bytes: int, dtype: str = "fp16") -> bool:
        """Whether the weights alone, stored as ``dtype``, fit in ``budget_bytes``."""
        return self.bytes_for(dtype) <= budget_bytes


__all__ = ["Architecture", "MemoryEstimate"]
