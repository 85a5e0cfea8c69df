"""The Parquet files of one split of a Hub dataset (the ``datasets`` library is not needed).

Hub datasets keep their data as Parquet in a few standard layouts, all understood here:

- ``data/{split}-00000-of-00001.parquet`` (what ``push_to_hub`` writes; config ``default``),
- ``{config}/{split}-00000-of-00001.parquet`` (one folder per config),
- ``{config}/{split}/0000.parquet`` (the Hub's automatic conversion on ``refs/convert/parquet``;
  tried automatically when the main branch has no Parquet files),
- ``{split}-*.parquet`` or ``{split}.parquet`` at the top level.

The same code serves ``entrenar fetch --dataset`` and ``dataset.name`` in a training YAML.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrenar_cli.errors import DataError, HubError, UsageError
from entrenar_cli.hub import _env
from entrenar_cli.hub.models import FileEntry, cached_commit, list_local_files
from entrenar_cli.hub.verify import evict, verify_parquet

if TYPE_CHECKING:
    import pyarrow as pa

CONVERTED_REVISION = "refs/convert/parquet"
_SHARD_SUFFIX = re.compile(r"^(.*?)(?:-\d+(?:-of-\d+)?)?$")


def _split_name(value: Any) -> str:
    name = value.value if isinstance(value, Enum) else value
    if not isinstance(name, str) or not name:
        raise UsageError(f"a dataset split is a name such as 'train' (got {value!r})")
    return name


@dataclass(frozen=True)
class DatasetOptions:
    """Which Hub dataset split to fetch, and where (``config=None`` takes ``default`` or the only one).

    The design document's ``DatasetOptions`` builder is :class:`entrenar_cli.hf_pipeline.DatasetOptions`
    (its ``hub_options()`` gives one of these).
    """

    split: str = "train"
    config: str | None = None
    revision: str | None = None
    cache_dir: Path | None = None
    local_dir: Path | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", _split_name(self.split))
        for name in ("cache_dir", "local_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())


@dataclass(frozen=True)
class DatasetFiles:
    """A fetched split: where its Parquet files are, which commit, how many rows."""

    name: str
    split: str
    config: str
    revision: str | None  # resolved commit hash (None for a local directory)
    requested_revision: str | None
    path: Path
    files: tuple[FileEntry, ...]
    source: str  # "hub", "cache" or "local"
    rows: int | None = None
    columns: tuple[str, ...] = ()

    @property
    def paths(self) -> list[Path]:
        return [self.path / f.path for f in self.files]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "split": self.split,
            "config": self.config,
            "revision": self.revision,
            "requested_revision": self.requested_revision,
            "source": self.source,
            "path": str(self.path),
            "files": [{"path": f.path, "size": f.size} for f in self.files],
            "total_size": self.total_size,
            "rows": self.rows,
            "columns": list(self.columns),
        }


class HfDatasetFetcher:
    """Fetches Parquet splits of Hub datasets. ``HfDatasetFetcher.new()`` uses ``HF_TOKEN``."""

    def __init__(self, token: str | None = None, *, progress: Callable[[str], None] | None = None) -> None:
        self._token = token or None
        self.progress = progress

    @classmethod
    def new(cls, *, progress: Callable[[str], None] | None = None) -> HfDatasetFetcher:
        return cls(_env.env_token(), progress=progress)

    def with_token(self, token: str | None) -> HfDatasetFetcher:
        return HfDatasetFetcher(token or self._token, progress=self.progress)

    def __repr__(self) -> str:
        return f"HfDatasetFetcher(token={'***' if self._token else None})"

    def fetch(self, name: str, options: DatasetOptions | None = None, **kwargs: Any) -> list[Path]:
        """The local paths of the split's Parquet files (``kwargs`` override ``options`` fields)."""
        return self.download(name, options, **kwargs).paths

    def download(self, name: str, options: DatasetOptions | None = None, **kwargs: Any) -> DatasetFiles:
        """Fetch one split and describe it (files, commit, rows, columns)."""
        options = dataclasses.replace(options or DatasetOptions(), **kwargs)
        local = Path(name).expanduser()
        if local.is_dir():
            names = list_local_files(local)
            cfg, files = plan_dataset_files(f"local directory {local}", names, options.split, options.config)
            return _finish(name, local, cfg, files, None, options, "local")
        if _env.sync_offline_flag():
            return self._from_cache(name, options)
        return self._from_hub(name, options)

    @staticmethod
    def load_parquet(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
        """Read a whole Parquet file into a ``pyarrow.Table``."""
        import pyarrow.parquet as pq

        verify_parquet(path)
        return pq.read_table(path, columns=list(columns) if columns else None)

    @staticmethod
    def iter_batches(
        path: str | Path, batch_size: int = 1024, columns: Sequence[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Stream a Parquet file in record batches (constant memory for large splits)."""
        import pyarrow.parquet as pq

        verify_parquet(path)
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)

    # -- online -----------------------------------------------------------------------------
    def _from_hub(self, name: str, options: DatasetOptions) -> DatasetFiles:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.hf_api import RepoFile

        cache_dir = options.cache_dir or _env.default_cache_dir()
        requested = options.revision or "main"
        ctx = _env.HubContext(
            repo_id=name, repo_type="dataset", revision=options.revision, token=self._token,
            target=options.local_dir or cache_dir,
            cached=cached_commit(cache_dir, name, "dataset", requested) is not None,
        )
        endpoint = _env.endpoint()
        api = HfApi(endpoint=endpoint, token=self._token)

        def listing(revision: str) -> tuple[str, dict[str, int]]:
            commit = api.repo_info(name, repo_type="dataset", revision=revision).sha
            if not commit:
                raise HubError(f"the Hub gave no commit for dataset '{name}' at '{revision}'",
                               "check HF_ENDPOINT points at a Hub server")
            tree = api.list_repo_tree(name, repo_type="dataset", revision=commit, recursive=True)
            return commit, {e.path: int(e.size) for e in tree if isinstance(e, RepoFile)}

        with _env.hub_errors(ctx):
            from huggingface_hub.utils import validate_repo_id

            validate_repo_id(name)
            commit, sizes = listing(requested)
            if options.revision is None and not any(_layout(n) for n in sizes):
                converted = _try(lambda: listing(CONVERTED_REVISION))
                if converted is not None and any(_layout(n) for n in converted[1]):
                    requested, (commit, sizes) = CONVERTED_REVISION, converted
            cfg, files = plan_dataset_files(f"dataset '{name}'", list(sizes), options.split, options.config)
            self._say(f"fetching {len(files)} Parquet file{'s' * (len(files) != 1)} of {name} "
                      f"[{cfg}/{options.split}] at {requested} (commit {commit[:12]})")
            folder = snapshot_download(
                name,
                repo_type="dataset",
                revision=commit,
                allow_patterns=[re.sub(r"([\[\]*?])", r"[\1]", f) for f in files],
                cache_dir=cache_dir,
                local_dir=options.local_dir,
                token=self._token,
                endpoint=endpoint,
            )
        if options.local_dir is None and requested != commit:
            from entrenar_cli.hub.models import _record_ref

            _record_ref(_env.storage_folder(cache_dir, name, "dataset"), requested, commit)
        return _finish(name, Path(folder), cfg, files, commit, dataclasses.replace(options, revision=requested), "hub")

    # -- offline ----------------------------------------------------------------------------
    def _from_cache(self, name: str, options: DatasetOptions) -> DatasetFiles:
        cache_dir = options.cache_dir or _env.default_cache_dir()
        requested = options.revision or "main"
        base: Path | None = None
        commit: str | None = None
        for revision in (requested,) if options.revision else (requested, CONVERTED_REVISION):
            commit = cached_commit(cache_dir, name, "dataset", revision)
            if commit:
                base = _env.storage_folder(cache_dir, name, "dataset") / "snapshots" / commit
                requested = revision
                break
        if options.local_dir is not None and options.local_dir.is_dir():
            base, commit = options.local_dir, None
        if base is None:
            raise HubError(
                f"dataset '{name}' at revision '{requested}' is not in {options.local_dir or cache_dir} "
                "and HF_HUB_OFFLINE is set",
                "fetch it once with network access (unset HF_HUB_OFFLINE), "
                "or point --cache-dir at the cache that has it",
            )
        cfg, files = plan_dataset_files(f"the cached copy of dataset '{name}'", list_local_files(base), options.split,
                                        options.config)
        return _finish(name, base, cfg, files, commit, dataclasses.replace(options, revision=requested), "cache")

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


def fetch_dataset_files(
    name: str,
    *,
    split: str = "train",
    config: str | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> list[Path]:
    """The local Parquet files of one split of Hub dataset ``name`` (downloaded when needed)."""
    fetcher = HfDatasetFetcher(token) if token else HfDatasetFetcher.new()
    return fetcher.fetch(name, DatasetOptions(split=split, config=config, revision=revision))


def plan_dataset_files(label: str, names: Sequence[str], split: str, config: str | None) -> tuple[str, list[str]]:
    """Pick the Parquet files of ``split`` (in ``config``) from a repo listing; return (config, files)."""
    layouts = {n: lay for n in sorted(names) if (lay := _layout(n)) is not None}
    if not layouts:
        raise DataError(
            f"{label} has no Parquet files",
            f"entrenar reads Parquet; try --revision {CONVERTED_REVISION} (the Hub's automatic conversion)",
        )
    configs = sorted({c for c, _ in layouts.values()})
    if config is None:
        if "default" in configs:
            config = "default"
        elif len(configs) == 1:
            config = configs[0]
        else:
            raise DataError(f"{label} has several configs: {', '.join(configs)}", "choose one with --config NAME")
    elif config not in configs:
        raise DataError(f"{label} has no config '{config}' (configs: {', '.join(configs)})",
                        "pass one of them with --config")
    files = [n for n, (c, s) in layouts.items() if c == config and s == split]
    if not files:
        splits = sorted({s for c, s in layouts.values() if c == config})
        raise DataError(
            f"{label} has no split '{split}' in config '{config}' (splits: {', '.join(splits)})",
            "pass one of them with --split (or dataset.split in the YAML)",
        )
    return config, files


def _layout(path: str) -> tuple[str, str] | None:
    """(config, split) that a Parquet file's path encodes in the Hub's layouts, else ``None``."""
    parts = path.split("/")
    if not parts[-1].endswith(".parquet") or any(p.startswith(".") for p in parts):
        return None
    stem = parts[-1][: -len(".parquet")]
    split = _SHARD_SUFFIX.match(stem).group(1)  # type: ignore[union-attr] - the pattern always matches
    if len(parts) == 1:
        return "default", split
    if len(parts) == 2:
        if stem.isdigit():  # {split}/0000.parquet
            return "default", parts[0]
        return ("default" if parts[0] == "data" else parts[0]), split
    if len(parts) == 3:  # {config}/{split}/0000.parquet or data/{split}/x.parquet
        split_dir = parts[1].removeprefix("partial-")
        return ("default" if parts[0] == "data" else parts[0]), split_dir
    return None


def _finish(
    name: str, base: Path, config: str, files: list[str], commit: str | None, options: DatasetOptions, source: str
) -> DatasetFiles:
    """Verify each Parquet file (a damaged download is removed) and read the row count and columns."""
    import pyarrow.parquet as pq

    entries: list[FileEntry] = []
    rows = 0
    columns: tuple[str, ...] = ()
    for rel in files:
        path = base / rel
        try:
            verify_parquet(path)
            meta = pq.ParquetFile(path).metadata
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types
            if source == "local":
                raise DataError(f"cannot read Parquet file {path}: {_env.first_line(exc)}") from None
            evict(path, local_dir=options.local_dir)
            raise DataError(
                f"corrupt Parquet file {rel} in dataset '{name}': {_env.first_line(exc)}",
                "it was removed from the cache: run the fetch again",
            ) from None
        rows += meta.num_rows
        columns = columns or tuple(meta.schema.to_arrow_schema().names)
        entries.append(FileEntry(rel, path.stat().st_size))
    return DatasetFiles(
        name=name, split=options.split, config=config, revision=commit,
        requested_revision=None if source == "local" else options.revision or "main",
        path=base, files=tuple(entries), source=source, rows=rows, columns=columns,
    )


def _try(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception:  # noqa: BLE001 - an optional probe; the caller reports the original problem
        return None
