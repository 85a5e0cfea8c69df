"""The `entrenar` command line: wiring only.

Each command lives in ``entrenar_cli/commands/<name>.py`` and imports the heavy library modules
inside its function body, so ``entrenar --help`` and ``entrenar validate`` never load torch.
Every :class:`~entrenar_cli.errors.EntrenarError` becomes one message, a hint and its exit code
(0 success, 1 runtime failure, 2 usage or configuration error); ``ENTRENAR_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from entrenar_cli import __version__
from entrenar_cli.errors import EXIT_RUNTIME, EntrenarError


def report_error(exc: BaseException) -> int:
    """Print an error the way users see every error; return the exit code."""
    from rich.markup import escape

    from entrenar_cli.console import err

    if os.environ.get("ENTRENAR_DEBUG"):
        traceback.print_exception(exc)
    if isinstance(exc, EntrenarError):
        err.print(f"[bold red]error:[/bold red] {escape(exc.message)}")
        if exc.hint:
            err.print(f"[dim]hint:[/dim] {escape(exc.hint)}")
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        err.print("[bold red]interrupted[/bold red]")
        return 130
    if isinstance(exc, MemoryError):
        err.print("[bold red]error:[/bold red] out of memory")
        err.print("[dim]hint:[/dim] lower training.batch_size or dataset.max_length, or run "
                  "'entrenar estimate' to plan the run")
        return EXIT_RUNTIME
    err.print(f"[bold red]error:[/bold red] unexpected failure: {type(exc).__name__}: {escape(str(exc))}")
    err.print("[dim]hint:[/dim] rerun with ENTRENAR_DEBUG=1 for the traceback and report it")
    return EXIT_RUNTIME


class EntrenarGroup(TyperGroup):
    """Maps library errors to messages and exit codes for every command (also under CliRunner)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, SystemExit):
            # typer's own control flow (help, usage errors) keeps its behaviour
            raise
        except BaseException as exc:  # noqa: BLE001 - this is the one place errors are mapped
            raise SystemExit(report_error(exc)) from None


app = typer.Typer(
    cls=EntrenarGroup,
    name="entrenar",
    help="Knowledge distillation and LoRA/QLoRA fine-tuning of Hugging Face models, from YAML.\n\n"
    "Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: rich_utils imports markdown-it (+0.3 s start-up)
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"entrenar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """entrenar: distill a big model's skill into a small one, or fine-tune it, from one YAML file."""


def _register() -> None:
    from entrenar_cli.commands import config_cmds, estimate, export, fetch, report, train

    for module in (fetch, estimate, train, export, report, config_cmds):
        module.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BaseException as exc:  # errors raised outside a command (argument parsing is click's)
        if isinstance(exc, SystemExit):
            raise
        sys.exit(report_error(exc))
