"""`entrenar estimate` (not built yet: fails loudly, never fakes success)."""

from __future__ import annotations

import typer


def estimate() -> None:
    """Not implemented yet (planned example: entrenar estimate ...)."""
    from entrenar_cli.errors import NotImplementedYet

    raise NotImplementedYet("'entrenar estimate' is not implemented yet")


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(estimate)
