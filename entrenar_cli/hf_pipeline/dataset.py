"""Datasets for the Python API: the engine's tokenized block store, iterable in batches.

``Dataset.from_path`` / ``Dataset.from_hub`` tokenize once into the same memory-mapped store the
CLI uses (:func:`entrenar_cli.data.load_blocks`), with the same held-out split by document.
``DatasetOptions`` is one class for local files and Hub datasets; its defaults are the YAML
schema's (:class:`entrenar_cli.config.schema.DatasetSettings`).
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from entrenar_cli.config.schema import DatasetSettings
from entrenar_cli.data import BlockDataset, TokenStore, epoch_order, load_blocks
from entrenar_cli.data import DistillationCollator as _Collator
from entrenar_cli.errors import DataError, UsageError
from entrenar_cli.hf_pipeline._api import New, python_errors, set_field


class Split(str, Enum):
    """Which part of a dataset: Hub split names; for local files Train is the training part and
    Validation/Test the held-out part (split by document, ``DatasetOptions.eval_fraction``)."""

    Train = "train"
    Validation = "validation"
    Test = "test"
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


_PLACEHOLDER = "<set by Dataset.from_path or Dataset.from_hub>"


class DatasetOptions(New):
    """What to read and how to cut it into blocks; builder methods return ``self``.

    ``DatasetOptions.default().split(Split.Train).max_length(128)``. Every default is the YAML
    schema's ``dataset`` section default. ``streaming`` is accepted for the document's API:
    entrenar always streams (Parquet in record batches into an on-disk token store), so memory
    does not grow with the dataset either way.
    """

    def __init__(self) -> None:
        # built without validation only because path/name are given later; every set is validated
        self.settings = DatasetSettings.model_construct(path=_PLACEHOLDER)
        self._streaming = True
        self._revision: str | None = None
        self._cache_dir: Path | None = None

    @classmethod
    def default(cls) -> "DatasetOptions":
        return cls()

    def _set(self, name: str, value: Any) -> "DatasetOptions":
        set_field(self.settings, name, value, f"DatasetOptions.{name}({value!r})")
        return self

    def split(self, split: Split | str) -> "DatasetOptions":
        return self._set("split", split.value if isinstance(split, Split) else str(split))

    def streaming(self, on: bool = True) -> "DatasetOptions":
        self._streaming = bool(on)
        return self

    def max_length(self, n: int) -> "DatasetOptions":
        return self._set("max_length", n)

    def eval_fraction(self, fraction: float) -> "DatasetOptions":
        return self._set("eval_fraction", fraction)

    def text_column(self, column: str) -> "DatasetOptions":
        return self._set("text_column", column)

    def format(self, fmt: str) -> "DatasetOptions":
        return self._set("format", fmt)

    def config(self, config: str | None) -> "DatasetOptions":
        return self._set("config", config)

    def max_documents(self, n: int | None) -> "DatasetOptions":
        return self._set("max_documents", n)

    def max_blocks(self, n: int | None) -> "DatasetOptions":
        return self._set("max_blocks", n)

    def revision(self, revision: str | None) -> "DatasetOptions":
        self._revision = revision
        return self

    def cache_dir(self, path: str | Path | None) -> "DatasetOptions":
        self._cache_dir = Path(path).expanduser() if path is not None else None
        return self

    @property
    def is_streaming(self) -> bool:
        return self._streaming

    def dataset_settings(self, *, path: str | None = None, name: str | None = None) -> DatasetSettings:
        """The validated ``dataset`` section these options describe for ``path`` or Hub ``name``."""
        data = self.settings.model_dump()
        data.update(path=path, name=name)
        try:
            return DatasetSettings.model_validate(data)
        except Exception as exc:  # pydantic.ValidationError
            from pydantic import ValidationError

            from entrenar_cli.hf_pipeline._api import config_error

            if isinstance(exc, ValidationError):
                raise config_error(exc, "DatasetOptions") from None
            raise

    def hub_options(self) -> Any:
        """The Hub fetcher's options (split, config, revision, cache dir)."""
        from entrenar_cli.hub.datasets import DatasetOptions as HubOptions

        return HubOptions(split=self.settings.split, config=self.settings.config, revision=self._revision,
                          cache_dir=self._cache_dir)

    def __repr__(self) -> str:
        fields = {k: v for k, v in self.settings.model_dump().items() if k not in ("path", "name")}
        return f"DatasetOptions({', '.join(f'{k}={v!r}' for k, v in fields.items())}, streaming={self._streaming})"


class Batch(dict):
    """One collated batch: ``batch.input_ids``, ``batch.attention_mask``, ``batch.labels`` (tensors).

    A plain dict for the engine; ``batch.dataset`` is the Dataset it came from.
    """

    dataset: "Dataset | None" = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DistillationCollator(New, _Collator):
    """The engine's collator (:class:`entrenar_cli.data.DistillationCollator`), with ``.new``.

    ``DistillationCollator(pad_token_id).max_length(512).pad_left(False).collate(examples)``.
    """


def _tokenizer_of(tokenizer: Any) -> Any:
    return getattr(tokenizer, "tokenizer", None) or tokenizer


class Dataset(New):
    """Packed token blocks (training part, plus the held-out part when there is one)."""

    def __init__(self, blocks: BlockDataset, heldout: BlockDataset | None = None, *, pad_token_id: int = 0,
                 settings: DatasetSettings | None = None):
        self.blocks = blocks
        self.heldout = heldout if heldout is not None else _empty_like(blocks)
        self.pad_token_id = pad_token_id
        # where the text came from: a trainer whose student has another tokenizer reads it again with both
        self.settings = settings

    @classmethod
    @python_errors
    def from_path(cls, path: str | Path, tokenizer: Any, options: DatasetOptions | None = None, *,
                  causal: bool | None = None) -> "Dataset":
        """Local text/JSONL/Parquet files (a file, directory or glob), tokenized with ``tokenizer``.

        ``tokenizer``: a tokenizer, or a :class:`SafeTensorsTeacher` (its tokenizer; encoders get
        CLS/SEP-framed blocks).
        """
        options = options or DatasetOptions()
        settings = options.dataset_settings(path=str(path))
        return cls._load(settings, tokenizer, options, causal, local=True)

    @classmethod
    @python_errors
    def from_hub(cls, name: str, tokenizer: Any, options: DatasetOptions | None = None, *,
                 causal: bool | None = None) -> "Dataset":
        """A Hub dataset split (downloaded as Parquet), tokenized with ``tokenizer``."""
        options = options or DatasetOptions()
        settings = options.dataset_settings(name=name)
        return cls._load(settings, tokenizer, options, causal, local=False)

    @classmethod
    def _load(cls, settings: DatasetSettings, tokenizer: Any, options: DatasetOptions, causal: bool | None,
              *, local: bool) -> "Dataset":
        if causal is None:
            causal = getattr(tokenizer, "task", "causal") == "causal"
        tok = _tokenizer_of(tokenizer)
        if tok is None:
            raise UsageError("Dataset needs a tokenizer", hint="pass tokenizer=teacher (a SafeTensorsTeacher) "
                             "or a transformers tokenizer")
        train, held = load_blocks(settings, tok, causal=causal)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if local and settings.split != Split.Train.value:
            if len(held) == 0:
                raise DataError(f"the held-out part of {settings.path} is empty",
                                hint="raise DatasetOptions.eval_fraction(...) or add documents")
            return cls(held, None, pad_token_id=pad, settings=settings)
        return cls(train, held, pad_token_id=pad, settings=settings)

    @classmethod
    def mock(cls, num_examples: int, seq_len: int, *, vocab_size: int = 1000, seed: int = 0) -> "Dataset":
        """``num_examples`` blocks of ``seq_len`` random token ids below ``vocab_size`` (seeded).

        For trying the API without data; pass the teacher's vocabulary size when training on it.
        """
        if num_examples <= 0 or seq_len <= 0 or vocab_size <= 0:
            raise UsageError(f"Dataset.mock({num_examples}, {seq_len}, vocab_size={vocab_size}): all must be > 0")
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, vocab_size, size=num_examples * seq_len + 1, dtype=np.uint32)
        return cls(BlockDataset(TokenStore(tokens, None, num_examples), seq_len, causal=True))

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def max_length(self) -> int:
        return self.blocks.length

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> Iterator[Batch]:
        """Consecutive batches of ``batch_size`` blocks (the last may be smaller).

        ``shuffle`` uses the engine's epoch order (a pure function of seed and epoch).
        """
        if batch_size <= 0:
            raise UsageError(f"Dataset.batches({batch_size}): batch_size must be > 0")
        n = len(self.blocks)
        order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
        import torch

        collator = _Collator(self.pad_token_id, causal=self.blocks.causal)
        for start in range(0, n, batch_size):
            ids = [int(i) for i in order[start : start + batch_size]]
            batch = Batch(collator.collate([self.blocks.block(i) for i in ids]))
            batch["block_ids"] = torch.tensor(ids)
            batch.dataset = self
            yield batch

    def __repr__(self) -> str:
        return f"Dataset({len(self.blocks)} blocks of {self.blocks.length} tokens, {len(self.heldout)} held out)"


def empty_blocks(length: int, causal: bool = True, cls_id: int | None = None,
                 sep_id: int | None = None) -> BlockDataset:
    """No blocks of ``length`` tokens: a missing held-out part, or data the trainer reads later."""
    return BlockDataset(TokenStore(np.zeros(0, dtype=np.uint32), None, 0), length, causal, cls_id, sep_id)


def _empty_like(blocks: BlockDataset) -> BlockDataset:
    return empty_blocks(blocks.length, blocks.causal, blocks.cls_id, blocks.sep_id)
