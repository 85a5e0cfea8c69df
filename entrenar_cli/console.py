"""The rich consoles: results go to stdout, messages and progress to stderr.

Keeping results on stdout and everything else on stderr lets shell scripts pipe ``--json``
output straight into ``jq``.
"""

from __future__ import annotations

import os
from typing import Any

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


class TaskProgress:
    """A rich progress bar on a terminal; a plain line per report otherwise (CI logs, pipes).

    ``advance`` moves the bar (silent without a terminal); ``say`` updates the bar's text or prints one
    line (``{unit} {done}/{total} {text}``), so a long job without a terminal still tells how far it is.
    """

    def __init__(self, label: str, total: int, *, unit: str, enabled: bool, start: int = 0):
        self.unit = unit
        self.enabled = enabled
        self.total = total
        self.bar: Any = None
        if enabled and err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def advance(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)

    def say(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=text)
        else:
            err.print(f"{self.unit} {done}/{self.total} {text}", markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
