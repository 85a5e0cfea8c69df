"""`entrenar export`: write a trained model as SafeTensors, APR or GGUF, then prove it with parity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from entrenar_cli.commands.options import JsonOption

FORMATS = ("safetensors", "apr", "gguf")
QUANTS = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0")


def _choice(value: str, choices: tuple[str, ...], flag: str) -> str:
    from entrenar_cli.errors import UsageError

    if value not in choices:
        raise UsageError(f"{flag} {value!r} is not one of: {', '.join(choices)}")
    return value


def export(
    model: Annotated[Path, typer.Argument(help="Model directory, LoRA adapter directory or .apr.json file.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="safetensors | apr | gguf.")] = "safetensors",
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Output directory (safetensors) or file; default: next to MODEL."),
    ] = None,
    quantize: Annotated[
        str,
        typer.Option(
            "--quantize", "-q",
            help="auto (keep the source precision) | f32 | f16 | bf16; GGUF also q8_0 | q4_0.",
        ),
    ] = "auto",
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="SafeTensors: split into shards above this size (e.g. 2GB, 500MB).")
    ] = "5GB",
    tokenizer: Annotated[
        Optional[Path],
        typer.Option("--tokenizer", help="Directory with the tokenizer files, if not next to the model."),
    ] = None,
    base: Annotated[
        Optional[Path],
        typer.Option("--base", help="Base model directory for a LoRA adapter (default: its adapter_config)."),
    ] = None,
    apr_encoding: Annotated[
        str, typer.Option("--apr-encoding", help="APR tensor data: numbers (readable) | base64 (compact).")
    ] = "numbers",
    no_metadata: Annotated[
        bool, typer.Option("--no-metadata", help="Leave the model metadata out of the file.")
    ] = False,
    parity: Annotated[
        bool, typer.Option("--parity/--no-parity", help="Read the export back and compare it with the source model.")
    ] = True,
    parity_reader: Annotated[
        str,
        typer.Option(
            "--parity-reader",
            help="GGUF: auto (transformers, plus llama.cpp when installed) | llama.cpp | transformers | both.",
        ),
    ] = "auto",
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Allow loading pickle weights (.bin); they can run arbitrary code.")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model code from the model's repository to run.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Export a model as SafeTensors (HF directory), APR (JSON) or GGUF (llama.cpp), then check parity.

    A LoRA adapter directory is merged into its base first. After writing, the export is read back
    by readers this project did not write (transformers; for GGUF also llama.cpp when
    llama-cpp-python is installed) and compared with the source model on held-out text (for
    f16/bf16/q8_0/q4_0: with the same rounding applied, the loss against the original is shown
    too): max logit difference, KL, top-1 agreement and file size are printed and saved as
    OUTPUT.parity.json. A failed check exits with code 1.

    Example: entrenar export runs/student --format gguf --quantize q8_0 -o student-q8_0.gguf
    """
    from entrenar_cli.console import info, out, warn
    from entrenar_cli.errors import EntrenarError
    from entrenar_cli.export.api import ExportFormat, ExportRequest, export_model

    request = ExportRequest(
        source=model,
        format=ExportFormat(_choice(fmt, FORMATS, "--format")),
        output=output,
        quantize=_choice(quantize, QUANTS, "--quantize"),
        max_shard_size=max_shard_size,
        include_metadata=not no_metadata,
        apr_encoding=_choice(apr_encoding, ("numbers", "base64"), "--apr-encoding"),
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        base=base,
        tokenizer=tokenizer,
        parity=parity,
        parity_reader=_choice(parity_reader, ("auto", "llama.cpp", "transformers", "both"), "--parity-reader"),
        overwrite=force,
    )
    _check_shard_size(max_shard_size)
    result = export_model(request, progress=info, warn=warn)
    for note in result.notes:
        info(f"note: {note}")
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        out.print(f"exported {result.format.value} ({result.precision}): {result.path}  [{result.size_human()}]")
        if result.tensors_identical is not None:
            out.print("tensors read back: " + ("identical" if result.tensors_identical else "DIFFERENT"))
        for report in result.parity:
            out.print(f"parity {report.summary()}")
        if result.parity_path is not None:
            out.print(f"parity report: {result.parity_path}")
    if not result.passed:
        failures = [f for r in result.parity for f in r.failures]
        if result.tensors_identical is False:
            failures.insert(0, "tensors read back differ from the source")
        raise EntrenarError(
            "parity check failed: " + "; ".join(failures),
            hint=f"the file was kept for inspection ({result.path}); do not ship it",
        )
    if not parity:
        warn("parity not checked (--no-parity): nothing proves this file computes what the source does")


def _check_shard_size(value: str) -> None:
    from entrenar_cli.errors import UsageError
    from entrenar_cli.export.safetensors_export import parse_shard_size

    try:
        parse_shard_size(value)
    except ValueError as exc:
        raise UsageError(f"--max-shard-size: {exc}") from None


def register(app: typer.Typer) -> None:
    app.command()(export)
