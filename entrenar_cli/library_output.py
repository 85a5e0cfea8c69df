"""Keep entrenar's output its own: library progress bars, notices and deprecation warnings off.

A plain LoRA run used to print bitsandbytes' "Failed to load CPU gemm_4bit_forward ... kernels"
(peft imports bitsandbytes whenever it is installed), transformers' "Loading weights" bars and a
``FutureWarning`` from peft calling a deprecated transformers property. None of them is something
the user can act on. Errors from those libraries still show (their loggers stay at ERROR), and
``ENTRENAR_DEBUG=1`` leaves everything as the libraries set it.
"""

from __future__ import annotations

import logging
import os
import warnings

# the libraries whose developer-facing warnings (FutureWarning, DeprecationWarning) are not the user's business
_LIBRARIES = r"(transformers|peft|accelerate|huggingface_hub|bitsandbytes|torch\.utils\.checkpoint)(\..*)?$"
_done = False


def quiet_libraries() -> None:
    """Silence library progress bars, notices and deprecation warnings (once per process)."""
    global _done
    if _done or os.environ.get("ENTRENAR_DEBUG"):
        return
    _done = True
    # set before bitsandbytes is imported (by peft): its CPU backend logs a warning at import time
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_LIBRARIES)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
