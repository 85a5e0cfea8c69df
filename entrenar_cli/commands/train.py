"""`entrenar distill` and `entrenar finetune`: YAML-driven training runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from entrenar_cli.commands.options import SetOption

ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in output.dir.")]
OverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", help="Delete what an earlier run wrote in output.dir (nothing else) and start again.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Load models and data, print the plan, train nothing.")]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar (metrics still go to metrics.jsonl).")
]


def distill(
    config: Annotated[Path, typer.Argument(help="Distillation YAML (see examples/configs/).")],
    set_: SetOption = None,
    resume: ResumeOption = False,
    overwrite: OverwriteOption = False,
    dry_run: DryRunOption = False,
    baseline: Annotated[bool, typer.Option(
        "--baseline", help="Also train the same student with plain cross-entropy and compare.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Train a student from a teacher: logit KD, hidden-state matching, attention transfer, LoRA.

    Example: entrenar distill examples/configs/distill-smollm2.yaml --set training.max_steps=50
    """
    from entrenar_cli.config import DistillationYamlConfig
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.distill import run

    cfg = DistillationYamlConfig.from_file(str(config), set_ or [])
    _run_to_the_end(run, cfg, RunOptions(resume=resume, overwrite=overwrite, dry_run=dry_run, baseline=baseline,
                                         progress=not quiet, config_path=config))


def finetune(
    config: Annotated[Path, typer.Argument(help="Fine-tuning YAML (see examples/configs/).")],
    set_: SetOption = None,
    resume: ResumeOption = False,
    overwrite: OverwriteOption = False,
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune a model: full, LoRA or QLoRA (4/8-bit base through bitsandbytes).

    Example: entrenar finetune examples/configs/finetune-lora.yaml --set method=qlora
    """
    from entrenar_cli.config import FineTuneYamlConfig
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.finetune import run

    cfg = FineTuneYamlConfig.from_file(str(config), set_ or [])
    _run_to_the_end(run, cfg, RunOptions(resume=resume, overwrite=overwrite, dry_run=dry_run, progress=not quiet,
                                         config_path=config))


def _run_to_the_end(run: Callable[[Any, Any], Any], cfg: Any, opts: Any) -> None:
    """Run a pipeline; once a SIGINT/SIGTERM has stopped it, further ones are ignored while the process
    exits, so repeated Ctrl-C cannot end in a traceback from an atexit handler."""
    from entrenar_cli.signals import STOP

    seen = STOP.total
    try:
        run(cfg, opts)
    finally:
        if STOP.total != seen:
            STOP.ignore_from_now()


def register(app: typer.Typer) -> None:
    app.command()(distill)
    app.command()(finetune)
