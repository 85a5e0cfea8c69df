"""`entrenar validate` and `entrenar schema`: check configs without loading any model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from entrenar_cli.commands.options import JsonOption, SetOption


def validate(
    config: Annotated[Path, typer.Argument(help="YAML config file (distill or finetune).")],
    kind: Annotated[
        Optional[str],
        typer.Option("--kind", help="distill or finetune; default: detected from the top-level keys."),
    ] = None,
    set_: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a YAML config and print the resolved configuration (every default filled in).

    Example: entrenar validate examples/configs/distill-smollm2.yaml --set training.max_steps=10
    """
    from entrenar_cli.config import CONFIG_KINDS, load_config
    from entrenar_cli.config.loader import parse_yaml, read_config_text
    from entrenar_cli.errors import ConfigError, UsageError

    if kind is None:
        from entrenar_cli.config import detect_kind

        try:
            data, _ = parse_yaml(read_config_text(config), str(config))
            kind = detect_kind(data)
        except ConfigError:  # the loader below reports the real problem with its position
            kind = "distill"
    if kind not in CONFIG_KINDS:
        raise UsageError(f"--kind {kind!r} is not a config kind", hint="use --kind distill or --kind finetune")
    cfg = load_config(config, CONFIG_KINDS[kind], set_ or [])
    resolved = cfg.model_dump(mode="json")
    # plain echo, not rich: validate runs in pre-commit hooks and CI, start-up time matters
    if as_json:
        typer.echo(json.dumps({"valid": True, "kind": kind, "file": str(config), "config": resolved}, indent=2))
        return
    import yaml

    typer.echo(f"valid {kind} config: {config}", err=True)
    typer.echo(yaml.safe_dump(resolved, sort_keys=False), nl=False)


def schema(
    kind: Annotated[str, typer.Argument(help="distill or finetune.")] = "distill",
) -> None:
    """Print the JSON Schema of a config kind (the files in schemas/ are generated from it).

    Example: entrenar schema finetune > finetune.schema.json
    """
    from entrenar_cli.config import CONFIG_KINDS
    from entrenar_cli.errors import UsageError

    if kind not in CONFIG_KINDS:
        raise UsageError(f"unknown config kind {kind!r}", hint="use 'distill' or 'finetune'")
    typer.echo(json_schema_text(kind), nl=False)


def json_schema_text(kind: str) -> str:
    """The JSON Schema for ``kind`` as the text stored in ``schemas/<kind>.schema.json``."""
    from entrenar_cli.config import CONFIG_KINDS

    doc = CONFIG_KINDS[kind].model_json_schema()
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(schema)
