"""Hub fetchers with the document's builder API, over :mod:`entrenar_cli.hub`.

``HfModelFetcher.new()`` reads ``HF_TOKEN``; ``HfModelFetcher.with_token("hf_...")`` uses the given
token (never shown: ``repr`` prints ``***``). ``FetchOptions.default().format(WeightFormat.SafeTensors)
.cache_dir("~/.cache/entrenar")`` builds the options the real fetcher takes.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any

from entrenar_cli.errors import UsageError
from entrenar_cli.hf_pipeline._api import hybridmethod, python_errors
from entrenar_cli.hf_pipeline.dataset import DatasetOptions
from entrenar_cli.hub import models as _hub_models
from entrenar_cli.hub.datasets import DatasetFiles
from entrenar_cli.hub.datasets import HfDatasetFetcher as _HubDatasetFetcher
from entrenar_cli.hub.models import ModelArtifact


class WeightFormat(str, Enum):
    """Weight files a fetch takes; equal (as strings) to :class:`entrenar_cli.hub.WeightFormat`."""

    SafeTensors = "safetensors"
    Gguf = "gguf"
    PyTorch = "pytorch"
    SAFETENSORS = "safetensors"
    GGUF = "gguf"
    PYTORCH = "pytorch"


def _hub_format(fmt: WeightFormat | str) -> _hub_models.WeightFormat:
    value = fmt.value if isinstance(fmt, Enum) else str(fmt).lower()
    try:
        return _hub_models.WeightFormat(value)
    except ValueError:
        raise UsageError(f"FetchOptions.format({fmt!r}): unknown weight format",
                         hint="use WeightFormat.SafeTensors, WeightFormat.Gguf or WeightFormat.PyTorch") from None


class FetchOptions:
    """Builder over the fetcher's frozen options; every method returns ``self``.

    Defaults are :class:`entrenar_cli.hub.FetchOptions`'s (SafeTensors only, no pickle).
    """

    def __init__(self, options: _hub_models.FetchOptions | None = None) -> None:
        self.options = options or _hub_models.FetchOptions()

    @classmethod
    def default(cls) -> "FetchOptions":
        return cls()

    @classmethod
    def new(cls) -> "FetchOptions":
        return cls()

    def _replace(self, **changes: Any) -> "FetchOptions":
        self.options = dataclasses.replace(self.options, **changes)
        return self

    def format(self, fmt: WeightFormat | str) -> "FetchOptions":
        return self._replace(format=_hub_format(fmt))

    def cache_dir(self, path: str | Path | None) -> "FetchOptions":
        return self._replace(cache_dir=path)

    def local_dir(self, path: str | Path | None) -> "FetchOptions":
        return self._replace(local_dir=path)

    def revision(self, revision: str | None) -> "FetchOptions":
        return self._replace(revision=revision)

    def allow_pickle(self, allow: bool = True) -> "FetchOptions":
        return self._replace(allow_pickle=bool(allow))

    def patterns(self, *patterns: str) -> "FetchOptions":
        return self._replace(patterns=self.options.patterns + tuple(patterns))

    def __repr__(self) -> str:
        return f"FetchOptions({self.options!r})"


def _unwrap(options: FetchOptions | _hub_models.FetchOptions | None) -> _hub_models.FetchOptions:
    if options is None:
        return _hub_models.FetchOptions()
    return options.options if isinstance(options, FetchOptions) else options


def _fetcher_with_token(cls: type, token: str | None) -> Any:
    return cls(token)


class HfModelFetcher(_hub_models.HfModelFetcher):
    """The real fetcher (:class:`entrenar_cli.hub.HfModelFetcher`) with the document's spelling."""

    def _copy_with_token(self, token: str | None) -> "HfModelFetcher":
        return type(self)(token or self._token, progress=self.progress)

    with_token = hybridmethod(_fetcher_with_token, _copy_with_token)  # type: ignore[assignment]

    @python_errors
    def download_model(self, repo_id: str, options: FetchOptions | _hub_models.FetchOptions | None = None
                       ) -> ModelArtifact:
        """Fetch ``repo_id`` (or check a local model directory) per ``options``; SafeTensors only by default."""
        opts = _unwrap(options)
        if opts.format is _hub_models.WeightFormat.PYTORCH and not opts.allow_pickle:
            raise UsageError(
                "FetchOptions.format(WeightFormat.PyTorch) downloads pickle weights, which can run arbitrary code "
                "when loaded",
                hint="add .allow_pickle(True) to the FetchOptions if you trust this repo, "
                "or use WeightFormat.SafeTensors",
            )
        return super().download_model(repo_id, opts)


class HfDatasetFetcher(_HubDatasetFetcher):
    """The real dataset fetcher, taking the same :class:`DatasetOptions` as :class:`Dataset`."""

    def _copy_with_token(self, token: str | None) -> "HfDatasetFetcher":
        return type(self)(token or self._token, progress=self.progress)

    with_token = hybridmethod(_fetcher_with_token, _copy_with_token)  # type: ignore[assignment]

    def _hub(self, options: Any) -> Any:
        return options.hub_options() if isinstance(options, DatasetOptions) else options

    @python_errors
    def fetch(self, name: str, options: Any = None, **kwargs: Any) -> list[Path]:  # type: ignore[override]
        """The local Parquet files of the split (``Dataset.from_hub`` tokenizes them for training)."""
        return super().fetch(name, self._hub(options), **kwargs)

    @python_errors
    def download(self, name: str, options: Any = None, **kwargs: Any) -> DatasetFiles:  # type: ignore[override]
        return super().download(name, self._hub(options), **kwargs)

    @staticmethod
    @python_errors
    def load_parquet(path: str | Path, columns: Any = None) -> Any:
        """A whole Parquet file as a ``pyarrow.Table`` (header checked first)."""
        return _HubDatasetFetcher.load_parquet(path, columns)


__all__ = ["FetchOptions", "HfDatasetFetcher", "HfModelFetcher", "ModelArtifact", "WeightFormat"]
