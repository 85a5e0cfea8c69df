"""The `entrenar` command line: wiring only.

Each command lives in ``entrenar_cli/commands/<name>.py`` and imports the heavy library modules
inside its function body, so ``entrenar --help`` and ``entrenar validate`` never load torch.
Every :class:`~entrenar_cli.errors.EntrenarError` becomes one message, a hint and its exit code
(0 success, 1 runtime failure, 2 usage or configuration error); ``ENTRENAR_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from entrenar_cli import __version__
from entrenar_cli.errors import EXIT_RUNTIME, explain


def report_error(exc: BaseException) -> int:
    """Print an error the way users see every error; return the exit code.

    Errors a user can cause (a full disk, a read-only mount, permissions, a file-size limit, input
    nested too deeply, out of memory) are explained by :func:`entrenar_cli.errors.explain`; only
    what it does not know, a genuine bug, reads "unexpected failure".
    """
    from rich.markup import escape

    from entrenar_cli.console import err

    if os.environ.get("ENTRENAR_DEBUG"):
        traceback.print_exception(exc)
    if isinstance(exc, KeyboardInterrupt):
        err.print("[bold red]interrupted[/bold red]")
        return 130
    if isinstance(exc, BrokenPipeError):
        # the reader of our output went away (`entrenar schema | head`): nothing to tell it
        _silence_stdout()
        return EXIT_RUNTIME
    known = explain(exc)
    if known is not None:
        err.print(f"[bold red]error:[/bold red] {escape(known.message)}")
        if known.hint:
            err.print(f"[dim]hint:[/dim] {escape(known.hint)}")
        return known.exit_code
    err.print(f"[bold red]error:[/bold red] unexpected failure: {type(exc).__name__}: {escape(str(exc))}")
    err.print("[dim]hint:[/dim] rerun with ENTRENAR_DEBUG=1 for the traceback and report it")
    return EXIT_RUNTIME


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file descriptor (tests capture output)


def ignore_file_size_signal() -> None:
    """Past ``ulimit -f`` the kernel sends SIGXFSZ, which kills the process without a word; ignored,
    the write fails with EFBIG instead and is reported with the file's name."""
    if hasattr(signal, "SIGXFSZ"):
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except (ValueError, OSError):
            pass  # not the main thread


def close_process_group() -> None:
    """After a command that succeeded under torchrun: every rank waits for the others (rank 0 may still be
    saving), then the process group is shut down. A rank that exits with a gloo group still open can abort
    in its worker threads' teardown ("terminate called without an active exception", pytorch#190489), and
    torchrun then kills the other ranks mid-save. Failed commands skip it: a rank stuck in a collective
    would deadlock the cleanup; torchrun ends those."""
    if "torch" not in sys.modules:  # --help, validate, catalogue estimates: torch never imported
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


class EntrenarGroup(TyperGroup):
    """Maps library errors to messages and exit codes for every command (also under CliRunner)."""

    def invoke(self, ctx: Any) -> Any:
        ignore_file_size_signal()
        try:
            result = super().invoke(ctx)
            close_process_group()
            return result
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
    from entrenar_cli.commands import cache, config_cmds, estimate, export, fetch, report, train

    for module in (fetch, estimate, train, cache, export, report, config_cmds):
        module.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    ignore_file_size_signal()
    try:
        app()
    except BaseException as exc:  # errors raised outside a command (argument parsing is click's)
        if isinstance(exc, SystemExit):
            raise
        sys.exit(report_error(exc))
    finally:
        _flush_stdout()


def _flush_stdout() -> None:
    """Flush now, so output that cannot be written (disk full, closed pipe) is not reported twice
    by the interpreter at exit; the error itself was already reported."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _silence_stdout()
