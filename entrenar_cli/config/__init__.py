"""Configuration: the pydantic schema and the YAML loader (no torch here)."""

from entrenar_cli.config.loader import load_config, validate_text
from entrenar_cli.config.schema import (
    CONFIG_KINDS,
    DistillationYamlConfig,
    FineTuneYamlConfig,
)


def detect_kind(data: dict) -> str:
    """Guess whether a parsed YAML mapping is a distill or a finetune config."""
    return "finetune" if "model" in data and "teacher" not in data else "distill"


__all__ = [
    "CONFIG_KINDS",
    "DistillationYamlConfig",
    "FineTuneYamlConfig",
    "detect_kind",
    "load_config",
    "validate_text",
]
