"""`entrenar distill` and `entrenar finetune` (not built yet)."""

from __future__ import annotations

import typer


def distill() -> None:
    """Not implemented yet (planned example: entrenar distill ...)."""
    from entrenar_cli.errors import NotImplementedYet

    raise NotImplementedYet("'entrenar distill' is not implemented yet")


def finetune() -> None:
    """Not implemented yet (planned example: entrenar finetune ...)."""
    from entrenar_cli.errors import NotImplementedYet

    raise NotImplementedYet("'entrenar finetune' is not implemented yet")


def register(app: typer.Typer) -> None:
    extra = {"allow_extra_args": True, "ignore_unknown_options": True}
    app.command(context_settings=extra)(distill)
    app.command(context_settings=extra)(finetune)
