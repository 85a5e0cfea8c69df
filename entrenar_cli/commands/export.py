"""`entrenar export` (not built yet: fails loudly, never fakes success)."""

from __future__ import annotations

import typer


def export() -> None:
    """Not implemented yet (planned example: entrenar export ...)."""
    from entrenar_cli.errors import NotImplementedYet

    raise NotImplementedYet("'entrenar export' is not implemented yet")


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(export)
