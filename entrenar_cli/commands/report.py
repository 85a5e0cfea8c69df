"""`entrenar report`: rebuild a run's report.html and loss_curves.png from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    output_dir: Annotated[
        Path, typer.Argument(metavar="OUTPUT_DIR", help="The run's output directory (holds metrics.jsonl).")
    ],
    open_: Annotated[
        bool,
        typer.Option("--open", "--open-path", help="Open report.html in the default web browser afterwards."),
    ] = False,
) -> None:
    """Rebuild the run report (report.html, loss_curves.png) of a distill or finetune run.

    Works on finished runs and on runs still in progress. Prints the report's path on stdout.

    Example: entrenar report runs/smollm2-kd --open
    """
    # the report package imports matplotlib only when it draws, so --help stays fast
    from rich.markup import escape

    from entrenar_cli.console import info, warn
    from entrenar_cli.report import render_report

    result = render_report(output_dir)
    for note in result.notes:
        warn(note)
    run = result.run
    step = run.last_step
    info(escape(f"{run.kind or 'run'} {run.name}: {run.status}" + (f", {step} steps" if step is not None else "")))
    if result.comparison is not None:
        info(escape(result.comparison["verdict"]))
    if result.png_path is not None:
        info(escape(f"loss curves: {result.png_path}"))
    typer.echo(str(result.html_path))
    if open_:
        import webbrowser

        if not webbrowser.open(result.html_path.resolve().as_uri()):
            warn(f"no web browser found; open {result.html_path} yourself")


def register(app: typer.Typer) -> None:
    app.command()(report)
