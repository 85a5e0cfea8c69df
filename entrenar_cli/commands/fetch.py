"""`entrenar fetch`: a model snapshot or a dataset split from the Hugging Face Hub, safe by default.

A thin layer over :mod:`entrenar_cli.hub`: check the arguments (all problems reported together),
call the library, print what was fetched. The library is imported inside the function so that
``entrenar --help`` does not load ``huggingface_hub``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from entrenar_cli.commands.options import JsonOption

if TYPE_CHECKING:
    from entrenar_cli.hub import DatasetFiles, ModelArtifact


class FormatChoice(str, Enum):
    safetensors = "safetensors"
    gguf = "gguf"
    pytorch = "pytorch"


def fetch(
    repo_id: Annotated[
        Optional[str],
        typer.Argument(
            metavar="REPO_ID",
            help="Model on the Hub (ORG/NAME), or a local model directory to check.",
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[
        Optional[str],
        typer.Option(
            "--dataset", "-d", metavar="NAME", help="Fetch the Parquet files of this Hub dataset instead of a model."
        ),
    ] = None,
    split: Annotated[
        Optional[str], typer.Option("--split", help="Dataset split.  [default: train]", show_default=False)
    ] = None,
    config: Annotated[
        Optional[str],
        typer.Option(
            "--config", help="Dataset config (subset).  [default: 'default', or the only one]", show_default=False
        ),
    ] = None,
    revision: Annotated[
        Optional[str],
        typer.Option(
            "--revision", "-r",
            help="Branch, tag or commit hash; the resolved commit is printed.  [default: main]",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        FormatChoice,
        typer.Option(
            "--format", "-f", case_sensitive=False,
            help="Weights to fetch: safetensors; gguf (pick the file with --include); "
            "pytorch (pickle, needs --allow-pickle).",
        ),
    ] = FormatChoice.safetensors,
    include: Annotated[
        Optional[list[str]],
        typer.Option(
            "--include", "-i", metavar="PATTERN",
            help="Also fetch files matching this glob (repeatable); with --format gguf it selects the .gguf file.",
        ),
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Allow pickle weights (.bin .pt .pth .ckpt .pkl) when a repo has no SafeTensors. "
            "Pickle can run arbitrary code when loaded: only for repos you trust.",
        ),
    ] = False,
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--cache-dir", help="Hub cache directory.  [default: HF_HUB_CACHE, or HF_HOME/hub]", show_default=False
        ),
    ] = None,
    local_dir: Annotated[
        Optional[Path],
        typer.Option("--local-dir", help="Put the files in this directory instead of the cache.", show_default=False),
    ] = None,
    token: Annotated[
        Optional[str],
        typer.Option(
            "--token",
            help="Hub access token for private or gated repos (overrides HF_TOKEN; never printed).",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Download a model (SafeTensors weights, config, tokenizer) or a dataset split from the Hub.

    Pickle weights are never downloaded without --allow-pickle; every SafeTensors header is
    checked after download. Honours HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and
    HF_HUB_OFFLINE (set HF_HUB_OFFLINE=1 to use the cache with no network).

    \b
    Examples:
      entrenar fetch HuggingFaceTB/SmolLM2-135M
      entrenar fetch Qwen/Qwen2.5-0.5B --revision main --local-dir ./qwen
      entrenar fetch TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF --format gguf --include '*Q4_K_M.gguf'
      entrenar fetch --dataset stanfordnlp/imdb --split test --json
    """
    from entrenar_cli.console import info, out
    from entrenar_cli.errors import UsageError

    problems = _check_arguments(repo_id, dataset, split, config, fmt, include, allow_pickle, cache_dir, local_dir)
    if problems:
        raise UsageError("; ".join(problems), "see 'entrenar fetch --help'")

    if dataset is not None:
        from entrenar_cli.hub import DatasetOptions, HfDatasetFetcher

        dataset_fetcher = HfDatasetFetcher(token) if token else HfDatasetFetcher.new()
        dataset_fetcher.progress = info
        options = DatasetOptions(
            split=split or "train", config=config, revision=revision, cache_dir=cache_dir, local_dir=local_dir
        )
        files = dataset_fetcher.download(dataset, options)
        if json_out:
            out.print_json(data=files.to_dict())
        else:
            for line in describe_dataset(files):
                out.print(line, markup=False)
        return

    from entrenar_cli.hub import FetchOptions, HfModelFetcher

    assert repo_id is not None
    fetcher = HfModelFetcher(token) if token else HfModelFetcher.new()
    fetcher.progress = info
    artifact = fetcher.download_model(
        repo_id,
        FetchOptions(
            format=fmt.value, revision=revision, cache_dir=cache_dir, local_dir=local_dir,
            allow_pickle=allow_pickle, patterns=tuple(include or ()),
        ),
    )
    if artifact.config is not None:
        import dataclasses

        from entrenar_cli.estimate import describe_architecture  # the estimator's summary of config.json

        artifact = dataclasses.replace(artifact, architecture=describe_architecture(artifact.config))
    if json_out:
        out.print_json(data=artifact.to_dict())
    else:
        for line in describe_model(artifact):
            out.print(line, markup=False)


def _check_arguments(
    repo_id: str | None,
    dataset: str | None,
    split: str | None,
    config: str | None,
    fmt: FormatChoice,
    include: list[str] | None,
    allow_pickle: bool,
    cache_dir: Path | None,
    local_dir: Path | None,
) -> list[str]:
    """Every problem with the arguments, named by the flag the user typed."""
    problems = []
    if repo_id is None and dataset is None:
        problems.append("give a model REPO_ID or --dataset NAME")
    if repo_id is not None and dataset is not None:
        problems.append("give either a model REPO_ID or --dataset NAME, not both")
    if dataset is not None:
        model_only = [
            flag for flag, used in (
                ("--format", fmt is not FormatChoice.safetensors), ("--include", bool(include)),
                ("--allow-pickle", allow_pickle),
            ) if used
        ]
        if model_only:
            problems.append(
                f"{', '.join(model_only)} {'apply' if len(model_only) > 1 else 'applies'} to models, not to --dataset"
            )
    else:
        dataset_only = [
            flag for flag, used in (("--split", split is not None), ("--config", config is not None)) if used
        ]
        if dataset_only:
            problems.append(f"{' and '.join(dataset_only)} {'need' if len(dataset_only) > 1 else 'needs'} --dataset")
    if cache_dir is not None and local_dir is not None:
        problems.append("give --cache-dir or --local-dir, not both")
    if fmt is FormatChoice.pytorch and not allow_pickle:
        problems.append("--format pytorch downloads pickle weights, which can run arbitrary code: add --allow-pickle")
    return problems


def describe_model(artifact: ModelArtifact) -> list[str]:
    """The human-readable report: what was fetched, where, which commit, which model."""
    from entrenar_cli.fsutil import human_bytes

    rows: list[tuple[str, str]] = [("model", artifact.repo_id)]
    if artifact.source == "local":
        rows.append(("source", "local path (nothing downloaded)"))
    else:
        via = "  (from the cache; HF_HUB_OFFLINE is set)" if artifact.source == "cache" else ""
        rows.append(("revision", f"{artifact.requested_revision} -> {artifact.revision or 'unknown commit'}{via}"))
    rows.append(("path", str(artifact.path)))
    weights = [w for w in artifact.weight_files if not w.endswith(".index.json")]
    kind = f"{len(weights)} shards + index" if artifact.sharded else ", ".join(weights) or "none (only --include files)"
    counted = f", {artifact.parameters_in_files:,} values in the files" if artifact.parameters_in_files else ""
    rows.append(("weights", f"{artifact.format.value}: {kind}{counted}"))
    rows.append(("files", f"{_count(len(artifact.files), 'file')}, {human_bytes(artifact.total_size)}"))
    width = max(len(f.path) for f in artifact.files) if artifact.files else 0
    file_lines = [f"{f.path:<{width}}  {human_bytes(f.size):>10}" for f in artifact.files]
    arch = artifact.architecture
    if arch:
        rows.append(("architecture", _architecture_line(arch)))
        memory = arch.get("weights_bytes")
        if isinstance(memory, dict) and memory:
            rows.append(("weights memory", ", ".join(f"{k} {human_bytes(v)}" for k, v in memory.items())))
    return _table(rows, after={"files": file_lines})


def describe_dataset(files: DatasetFiles) -> list[str]:
    """The human-readable report for a dataset split."""
    from entrenar_cli.fsutil import human_bytes

    rows: list[tuple[str, str]] = [("dataset", f"{files.name}  [config {files.config}, split {files.split}]")]
    if files.source != "local":
        via = "  (from the cache; HF_HUB_OFFLINE is set)" if files.source == "cache" else ""
        rows.append(("revision", f"{files.requested_revision} -> {files.revision or 'unknown commit'}{via}"))
    rows.append(("path", str(files.path)))
    rows.append(("files", f"{_count(len(files.files), 'Parquet file')}, {human_bytes(files.total_size)}"))
    width = max(len(f.path) for f in files.files)
    file_lines = [f"{f.path:<{width}}  {human_bytes(f.size):>10}" for f in files.files]
    rows.append(("rows", f"{files.rows:,}  (columns: {', '.join(files.columns)})"))
    return _table(rows, after={"files": file_lines})


def _architecture_line(arch: dict[str, Any]) -> str:
    name = str(arch.get("model_type") or "unknown")
    classes = [arch["architecture"]] if arch.get("architecture") else arch.get("architectures")
    if classes:
        name += f" ({', '.join(map(str, classes))})"
    parts = []
    for key, label in (("num_layers", "layers"), ("hidden_size", "hidden")):
        if arch.get(key) is not None:
            parts.append(f"{arch[key]} {label}" if key == "num_layers" else f"{label} {arch[key]}")
    if arch.get("num_heads") is not None:
        kv = arch.get("num_kv_heads")
        parts.append(f"{arch['num_heads']} heads" + (f" ({kv} kv)" if kv and kv != arch["num_heads"] else ""))
    if arch.get("vocab_size") is not None:
        parts.append(f"vocab {arch['vocab_size']:,}")
    if arch.get("parameters") is not None:
        parts.append(f"{arch['parameters']:,} parameters")
    if arch.get("note"):
        parts.append(str(arch["note"]))
    return name + (": " + ", ".join(parts) if parts else "")


def _table(rows: list[tuple[str, str]], *, after: dict[str, list[str]]) -> list[str]:
    width = max(len("weights memory"), *(len(k) for k, _ in rows))  # fixed: reports line up across runs
    lines = []
    for key, value in rows:
        lines.append(f"{key:<{width}}  {value}")
        lines.extend(" " * (width + 4) + extra for extra in after.get(key, []))
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def register(app: typer.Typer) -> None:
    app.command()(fetch)
