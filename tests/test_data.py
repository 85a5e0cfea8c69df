"""Data: text, JSONL, Parquet and globs into a memory-mapped token store; packing; held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from entrenar_cli.config.schema import DatasetSettings
from entrenar_cli.data import (
    DistillationCollator,
    is_heldout,
    load_blocks,
    resolve_files,
)


@pytest.fixture
def tok(tiny_tokenizer_dir: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_formats_give_the_same_tokens(tok, stdlib_text: Path, tmp_path: Path) -> None:  # noqa: ANN001
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f.read_text() for f in sorted(stdlib_text.glob("*.py"))]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
    pq.write_table(pa.table({"body": texts}), tmp_path / "rows.parquet")
    stores = []
    for name in ("rows.jsonl", "rows.parquet"):
        train, held = load_blocks(DatasetSettings(path=str(tmp_path / name), text_column="body", max_length=32,
                                                  eval_fraction=0.0), tok)
        stores.append(np.asarray(train.store.tokens))
    assert len(stores[0]) > 1000 and np.array_equal(stores[0], stores[1])
    eos = tok.eos_token_id
    assert int((stores[0] == eos).sum()) == len(texts)  # one EOS between documents


def test_blocks_pack_without_padding_and_labels_shift(tok, stdlib_text: Path) -> None:  # noqa: ANN001
    train, held = load_blocks(DatasetSettings(path=str(stdlib_text), max_length=16, eval_fraction=0.2), tok)
    ids, mask = train.block(3)
    assert len(ids) == 17 and mask.all()
    assert np.array_equal(ids, np.asarray(train.store.tokens[48:65]))
    batch = DistillationCollator(0).collate([train.block(0), train.block(1)])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["labels"][0].tolist() == train.block(0)[0][1:].tolist()
    assert len(held) > 0 and len(train) > len(held)


def test_store_is_reused_and_split_is_by_document(tok, stdlib_text: Path) -> None:  # noqa: ANN001
    settings = DatasetSettings(path=str(stdlib_text), max_length=16, eval_fraction=0.3)
    a, _ = load_blocks(settings, tok)
    manifest = Path(a.store.tokens.filename).parent / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    b, _ = load_blocks(settings, tok)
    assert manifest.stat().st_mtime_ns == stamp and len(a) == len(b)
    assert is_heldout("doc-a", 0.3) == is_heldout("doc-a", 0.3)
    share = sum(is_heldout(f"doc-{i}", 0.3) for i in range(2000)) / 2000
    assert 0.25 < share < 0.35


def test_heldout_split_smaller_than_a_block_takes_the_last_document(tok, stdlib_text: Path,  # noqa: ANN001
                                                                    tmp_path: Path) -> None:
    sources = sorted(stdlib_text.glob("*.py"))
    names = [f"doc{i:03d}.py" for i in range(200)]
    held_name = next(n for n in names if is_heldout(n, 0.1))
    train_names = [n for n in names if not is_heldout(n, 0.1)][:3]
    for n in train_names:
        (tmp_path / n).write_text(sources[0].read_text())
    (tmp_path / held_name).write_text("x = 1\n")  # hashing holds it out, but it is far shorter than a block
    train, held = load_blocks(DatasetSettings(path=str(tmp_path / "*.py"), max_length=64, eval_fraction=0.1), tok)
    one_doc = len(tok(sources[0].read_text())["input_ids"]) + 1  # + EOS
    assert len(held) >= 1 and len(held.store) >= one_doc
    assert len(train.store) == 2 * one_doc


def test_glob_and_stdlib_placeholder_and_missing(tmp_path: Path) -> None:
    from entrenar_cli.errors import DataError

    assert any(f.name == "decoder.py" for f in resolve_files("{stdlib}/json/*.py"))
    with pytest.raises(DataError, match="matches no files"):
        resolve_files(str(tmp_path / "none-*.txt"))


def test_collator_pads_variable_examples_and_masks_padding() -> None:
    batch = DistillationCollator(pad_token_id=0).collate([[5, 6, 7, 8], [9, 10]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 10, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8], [10, -100, -100]]
    left = DistillationCollator(pad_token_id=0).pad_left(True).collate([[5, 6, 7, 8], [9, 10]])
    assert left["input_ids"][1].tolist() == [0, 0, 9] and left["labels"][1].tolist()[-1] == 10


def test_left_padding_never_trains_a_label_whose_input_is_padding() -> None:
    from entrenar_cli.losses import IGNORE_INDEX

    batch = DistillationCollator(pad_token_id=0, pad_left=True).collate([[5, 6, 7, 8], [9, 10]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    # row 2: inputs pad, pad, 9 -> targets pad (padding), 9 (its input is padding), 10 (its input is 9)
    assert batch["labels"].tolist() == [[6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    trained = batch["labels"] != IGNORE_INDEX
    assert bool((batch["attention_mask"][trained] == 1).all())  # every trained label has a real input


def test_hub_dataset_options_validate_the_split() -> None:
    import dataclasses

    from entrenar_cli import hub
    from entrenar_cli.errors import UsageError

    fetch = hub.DatasetOptions(split="validation", config="en", cache_dir="~/x")
    assert (fetch.split, fetch.config, fetch.cache_dir) == ("validation", "en", Path("~/x").expanduser())
    assert dataclasses.replace(fetch, revision="main").split == "validation"
    with pytest.raises(UsageError, match="a dataset split is a name"):
        hub.DatasetOptions(split="")
