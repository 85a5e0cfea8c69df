"""The rich consoles: results go to stdout, messages and progress to stderr.

Keeping results on stdout and everything else on stderr lets shell scripts pipe ``--json``
output straight into ``jq``.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def is_main_process() -> bool:
    """False in the non-zero ranks of a torchrun / accelerate launch (they stay quiet)."""
    return os.environ.get("RANK", "0") == "0"


def process_rank() -> int:
    """This process's rank in a torchrun / accelerate launch (0 in a plain run)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes of this launch (torchrun / accelerate launch set WORLD_SIZE; a plain run is one)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def info(message: str) -> None:
    """A progress or status line for humans (stderr), from the main process only."""
    if is_main_process():
        err.print(message, markup=False)


def warn(message: str) -> None:
    """A warning the user should read (stderr), from the main process only."""
    if is_main_process():
        err.print(f"[yellow]warning:[/yellow] {escape(message)}")
