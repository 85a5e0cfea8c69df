"""entrenar: knowledge distillation and parameter-efficient fine-tuning of Hugging Face models.

The package root stays import-light: the heavy parts (torch, transformers, peft) load only when
a name that needs them is first touched, so ``entrenar --help`` and ``entrenar validate`` start
instantly.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first access (PEP 562)
_LAZY = {
    "DistillationYamlConfig": "entrenar_cli.config",
    "FineTuneYamlConfig": "entrenar_cli.config",
    "load_config": "entrenar_cli.config",
    "EntrenarError": "entrenar_cli.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'entrenar_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["__version__", *_LAZY]
