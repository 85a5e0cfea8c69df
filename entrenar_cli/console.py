"""The rich consoles: results go to stdout, messages and progress to stderr.

Keeping results on stdout and everything else on stderr lets shell scripts pipe ``--json``
output straight into ``jq``.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    """A progress or status line for humans (stderr)."""
    err.print(message)


def warn(message: str) -> None:
    """A warning the user should read (stderr)."""
    err.print(f"[yellow]warning:[/yellow] {escape(message)}")
