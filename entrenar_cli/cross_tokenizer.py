"""Cross-tokenizer distillation: a teacher and a student whose vocabularies differ.

Token ids of two tokenizers mean nothing to each other, so nothing here ever compares them. What
both sides share is the *text*: each document is tokenized by both tokenizers with character
offsets, and a student position is compared with a teacher position only where both have read
exactly the same characters (their tokens end at the same character). There both models predict
the continuation of the same prefix, so their next-token distributions are comparable:

* **ULD** (Universal Logit Distillation, Boizard et al. 2024): the L1 distance between the two
  probability vectors sorted in decreasing order (the shorter padded with zeros). It needs no
  vocabulary mapping at all (the closed-form 1-D optimal-transport distance), but it only teaches
  the *shape* of the teacher's distribution, not which token is likely.
* **GOLD-style hybrid** (in the spirit of TRL's GOLD trainer): token strings are normalised (byte-level
  BPE ``Ġ``, SentencePiece ``▁`` and WordPiece ``##`` markers stripped, lower-cased when either
  tokenizer lower-cases) and grouped by that key; the probability mass of every key both vocabularies
  have is compared with forward KL (this teaches *which* token), the remaining tokens of each side
  with ULD.

Hidden states (and attention maps) have one vector per token, and the two sides have different
token counts, so they are mean-pooled per aligned *span* (the tokens between two consecutive
aligned boundaries cover the same text on both sides) and compared span by span.

The "vocab doctor" (:func:`vocab_doctor`) summarises for the plan what the two vocabularies share
and how much of a data sample aligns, so a user sees before training whether the pair is workable.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from entrenar_cli.data import BlockDataset, TokenStore
from entrenar_cli.errors import EXIT_USAGE, ConfigError, DataError, ModelError

# share of a data sample's teacher tokens that must have a counterpart in the student's vocabulary
# for method: auto to pick the hybrid (below it, ULD). A judgement, not yet a measurement: the hybrid's
# KL term is only as good as the shared part is large, and ULD alone never says which token is likely.
# BENCHMARKS.md "Cross-tokenizer distillation (issue 20)" has the one pair measured so far.
AUTO_GOLD_MIN_SHARED = 0.5
# training blocks the vocab doctor measures alignment coverage on
DOCTOR_SAMPLE_BLOCKS = 32
# aligned positions per chunk of the vocabulary-wide loss computation (bounds the sort buffers)
CHUNK_ROWS = 256
STORE_VERSION = 1
EOS_KEY = "\x00eos"  # the key both end-of-document tokens share (never a real token string)


# ---- tokenizers --------------------------------------------------------------------------------


def require_offsets(tokenizer: Any, role: str) -> None:
    """Refuse a tokenizer that cannot report character offsets (a "slow", pure-Python tokenizer).

    Alignment is by characters; without offsets the only alternative is guessing from decoded
    strings, which silently misaligns on normalised text (lower-casing, accents, whitespace).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"the {role}'s tokenizer ({type(tokenizer).__name__}) cannot report character offsets, which "
            "cross-tokenizer distillation needs to align the two tokenizations",
            hint="give the model a fast tokenizer (a tokenizer.json file; transformers converts most "
                 "tokenizers with AutoTokenizer.from_pretrained(..., use_fast=True) then save_pretrained)",
            exit_code=EXIT_USAGE,
        )


def end_token_id(tokenizer: Any) -> int | None:
    """The token a causal LM sees between documents (EOS, else SEP), as :func:`data.text_encoder` uses."""
    eos = tokenizer.eos_token_id
    return tokenizer.sep_token_id if eos is None else eos


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, starts, ends) of ``text`` without special tokens; offsets are character indices."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    # offsets must never run backwards (they do not for any HF fast tokenizer); clamp defensively so
    # the binary searches over them stay valid
    starts = np.maximum.accumulate(offsets[:, 0]) if len(ids) else offsets[:, 0]
    ends = np.maximum.accumulate(offsets[:, 1]) if len(ids) else offsets[:, 1]
    return ids, starts, ends


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _scheme(tokenizer: Any) -> tuple[str, str]:
    """(marker scheme, WordPiece continuation prefix): 'bytelevel', 'metaspace', 'wordpiece' or 'plain'."""
    backend = tokenizer.backend_tokenizer
    model = backend.model
    pieces = f"{backend.pre_tokenizer!r} {backend.decoder!r}"
    if type(model).__name__ == "WordPiece":
        return "wordpiece", getattr(model, "continuing_subword_prefix", "##") or "##"
    if "ByteLevel" in pieces:
        return "bytelevel", ""
    if "Metaspace" in pieces or "▁" in pieces:
        return "metaspace", ""
    return "plain", ""


def _lowercases(tokenizer: Any) -> tuple[bool, bool]:
    """(lower-cases, strips accents): what the tokenizer's normaliser does to text, measured."""
    norm = tokenizer.backend_tokenizer.normalizer
    if norm is None:
        return False, False
    return norm.normalize_str("Ab") == "ab", norm.normalize_str("é") == "e"


def canonical_tokens(tokenizer: Any, *, lowercase: bool = False, strip_accents: bool = False) -> list[str | None]:
    """One comparable string per token id (None: special, or a byte fragment that is not text).

    Word-boundary markers are stripped so ``Ġworld`` (byte-level BPE), ``▁world`` (SentencePiece),
    ``world`` and ``##world`` (WordPiece) share the key ``world``: which of them is meant is already
    fixed by the aligned text position. Whitespace-only tokens keep their whitespace as the key.
    """
    scheme, prefix = _scheme(tokenizer)
    special = set(tokenizer.all_special_ids)
    eos = {end_token_id(tokenizer)}
    decoder = _byte_decoder()
    keys: list[str | None] = [None] * len(tokenizer)
    for token, idx in tokenizer.get_vocab().items():
        if idx >= len(keys):
            keys.extend([None] * (idx + 1 - len(keys)))
        if idx in eos:
            keys[idx] = EOS_KEY
            continue
        if idx in special:
            continue
        text: str | None = token
        if scheme == "bytelevel":
            try:
                text = bytes(decoder[c] for c in token).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                text = None  # part of a multi-byte character: no text of its own
        elif scheme == "metaspace":
            text = None if (token.startswith("<0x") and token.endswith(">")) else token.replace("▁", " ")
        elif scheme == "wordpiece" and token.startswith(prefix):
            text = token[len(prefix):]
        if text is None or text == "":
            continue
        core = text.strip()
        if not core:
            keys[idx] = text  # whitespace tokens ("Ġ", "Ċ", "ĉĉ") match only the same whitespace
            continue
        if lowercase:
            core = core.lower()
        if strip_accents:
            core = "".join(c for c in unicodedata.normalize("NFD", core) if unicodedata.category(c) != "Mn")
        keys[idx] = core
    return keys


@dataclass
class SharedVocab:
    """Keys both vocabularies have: per token id the index of its shared key, or -1."""

    teacher_key: np.ndarray  # int64 [V_teacher]
    student_key: np.ndarray  # int64 [V_student]
    keys: list[str]
    prefix_mapped: int = 0  # teacher tokens keyed by the first student token of their text

    @property
    def size(self) -> int:
        return len(self.keys)


def shared_vocab(teacher_tok: Any, student_tok: Any) -> SharedVocab:
    """Group both vocabularies by canonical key; a key counts as shared when both sides have it.

    Normalisation is the union of what either tokenizer does to text: an uncased student cannot
    tell ``The`` from ``the``, so both of the teacher's spellings feed the one student token.

    A teacher token whose string the student lacks (``print(``, ``Ġself.``) is keyed by the first
    token of the student's own tokenization of that string (``print``, ``self``): predicting it is,
    for the student, predicting that first piece next, so its probability belongs there. Only
    tokens with no text the student keeps (whitespace it drops, byte fragments) stay unkeyed.
    """
    lt, at = _lowercases(teacher_tok)
    ls, as_ = _lowercases(student_tok)
    lower, accents = lt or ls, at or as_
    t_keys = canonical_tokens(teacher_tok, lowercase=lower, strip_accents=accents)
    s_keys = canonical_tokens(student_tok, lowercase=lower, strip_accents=accents)
    common = sorted({k for k in t_keys if k is not None} & {k for k in s_keys if k is not None})
    index = {k: i for i, k in enumerate(common)}
    t_map = np.asarray([index.get(k, -1) if k is not None else -1 for k in t_keys], dtype=np.int64)
    unkeyed = [i for i, k in enumerate(t_keys) if k is not None and t_map[i] < 0 and k.strip()]
    prefix_mapped = 0
    if unkeyed:
        firsts = student_tok([t_keys[i] for i in unkeyed], add_special_tokens=False)["input_ids"]
        for i, ids in zip(unkeyed, firsts):
            key = s_keys[ids[0]] if ids and ids[0] < len(s_keys) else None
            if key is None or key == EOS_KEY:
                continue
            if key not in index:
                index[key] = len(common)
                common.append(key)
            t_map[i] = index[key]
            prefix_mapped += 1
    s_map = np.asarray([index.get(k, -1) if k is not None else -1 for k in s_keys], dtype=np.int64)
    return SharedVocab(t_map, s_map, common, prefix_mapped)


# ---- alignment -----------------------------------------------------------------------------------


def _last_at_character(ends: np.ndarray) -> np.ndarray:
    """Per token, whether it is the *last* one ending at its character (bool mask).

    Byte-level tokenizers split one character over several tokens that all end at that character;
    only after the last of them has the model read the whole character.
    """
    last = np.ones(len(ends), dtype=bool)
    last[:-1] = ends[1:] != ends[:-1]
    return last


def boundaries(ends: np.ndarray) -> np.ndarray:
    """Positions whose token is the last one ending at its character (:func:`_last_at_character`)."""
    return np.nonzero(_last_at_character(ends))[0]


def align(s_ends: np.ndarray, t_ends: np.ndarray, *, s_starts: np.ndarray | None = None,
          t_starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(student positions, teacher positions) whose tokens end at the same character.

    At such a pair both models have read the same text and predict its continuation. When starts
    are given, tokens of zero width (special tokens without text) never align.
    """
    s_b, t_b = boundaries(s_ends), boundaries(t_ends)
    if s_starts is not None:
        s_b = s_b[s_ends[s_b] > s_starts[s_b]]
    if t_starts is not None:
        t_b = t_b[t_ends[t_b] > t_starts[t_b]]
    _, si, ti = np.intersect1d(s_ends[s_b], t_ends[t_b], assume_unique=True, return_indices=True)
    return s_b[si], t_b[ti]


def align_predictions(s_starts: np.ndarray, s_ends: np.ndarray, t_ends: np.ndarray, n_student: int,
                      n_teacher: int) -> tuple[np.ndarray, np.ndarray]:
    """(student positions, teacher positions) whose *next* tokens cover the same text.

    The logit losses compare what the two models predict next, so the pairing is by the predicted
    token, not by the text read so far: student position ``s`` pairs with teacher position ``t``
    when tokens ``s + 1`` and ``t + 1`` end at the same character and the teacher has read what
    the student has read plus at most the text the student's tokenizer skips before its next token
    (``end(s) <= end(t) <= start(s + 1)``). Pairing by "read the same text" alone (:func:`align`)
    would, wherever the student's tokenizer drops whitespace (WordPiece; newlines and indentation
    in code), set the teacher's prediction of a newline against the student's prediction of the
    next word: targets the student cannot express. Where the next tokens do not cover the same text
    (``pr`` + ``##int`` against ``print``) nothing is paired.

    The arrays hold ``n_student`` / ``n_teacher`` input positions followed by at least one more
    token where the text continues (its offsets say what the last input position predicts).
    """
    if n_student == 0 or n_teacher == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    s = np.arange(min(n_student, len(s_ends) - 1))
    nxt = s + 1
    e = s_ends[nxt]
    ok = e > s_starts[nxt]  # the next token has text (not a zero-width special token)
    last = _last_at_character(s_ends)[nxt]  # ... and is the last token ending at its character
    j = np.searchsorted(t_ends, e, side="right") - 1  # the teacher's last token ending there
    t = j - 1
    ok &= last & (j >= 1) & (t < n_teacher)
    j, t = np.clip(j, 0, len(t_ends) - 1), np.clip(t, 0, len(t_ends) - 1)
    ok &= (t_ends[j] == e) & (t_ends[t] < e)
    ok &= (s_ends[s] <= t_ends[t]) & (t_ends[t] <= s_starts[nxt])
    return s[ok].astype(np.int64), t[ok].astype(np.int64)


def span_ids(positions: np.ndarray, length: int) -> np.ndarray:
    """Per token, the aligned span it belongs to (-1 for none): span k covers the tokens after aligned
    position k-1 up to and including position k (k >= 1; the text before the first aligned boundary
    is not known to be the same on both sides)."""
    out = np.full(length, -1, dtype=np.int64)
    for k in range(1, len(positions)):
        out[positions[k - 1] + 1: positions[k] + 1] = k - 1
    return out


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class _Side:
    """One tokenization of a split: ids and global character offsets (uint32 / int64)."""

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


@dataclass
class TeacherView:
    """The teacher's tokens for one student block and the aligned positions within it."""

    ids: np.ndarray  # teacher input ids
    s_pos: np.ndarray  # student input positions that have read the same text as ...
    t_pos: np.ndarray  # ... these teacher positions (span boundaries for hidden states, attention)
    s_pred: np.ndarray  # student input positions whose next token covers the same text as ...
    t_pred: np.ndarray  # ... these teacher positions' next token (the logit losses' pairs)


@dataclass
class CrossBlockDataset(BlockDataset):
    """Student blocks (what the engine trains on, exactly like :class:`BlockDataset`) that also know
    the teacher's tokenization of the same characters.

    The engine hands training batches' block indices to the objective; evaluation batches carry
    none, so blocks read for them are registered by the content of their student ids.
    """

    student_side: _Side | None = None
    teacher_side: _Side | None = None
    teacher_max_positions: int | None = None
    register: bool = False
    _registry: dict[bytes, int] = field(default_factory=dict, repr=False)

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = super().block(i)
        if self.register:
            self._registry[_row_key(ids[: self.length])] = i
        return ids, mask

    def find(self, student_inputs: np.ndarray) -> int | None:
        """The index of the block whose student inputs these are (blocks read through :meth:`block`)."""
        return self._registry.get(_row_key(student_inputs))

    def teacher_view(self, i: int) -> TeacherView:
        """Teacher tokens lying inside block i's input characters, and the aligned positions."""
        assert self.student_side is not None and self.teacher_side is not None
        s, t = self.student_side, self.teacher_side
        lo, hi = i * self.length, i * self.length + self.length  # student inputs
        char_lo, char_hi = int(s.starts[lo]), int(s.ends[hi - 1])
        t_lo = int(np.searchsorted(t.starts, char_lo, side="left"))
        t_hi = int(np.searchsorted(t.ends, char_hi, side="right"))
        if self.teacher_max_positions:
            t_hi = min(t_hi, t_lo + self.teacher_max_positions)
        t_hi = max(t_hi, t_lo)
        s_pos, t_pos = align(s.ends[lo:hi], t.ends[t_lo:t_hi], s_starts=s.starts[lo:hi], t_starts=t.starts[t_lo:t_hi])
        s_pred, t_pred = align_predictions(s.starts[lo:hi + 1], s.ends[lo:hi + 1], t.ends[t_lo:t_hi + 1],
                                           hi - lo, t_hi - t_lo)
        return TeacherView(np.asarray(t.ids[t_lo:t_hi], dtype=np.int64), s_pos, t_pos, s_pred, t_pred)


def _row_key(ids: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def encode_pair(text: str, student_tok: Any, teacher_tok: Any, base: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """Both tokenizations of one document, offsets shifted by ``base``, each followed by its end-of-
    document token placed on one virtual character after the text (so the two align there too)."""
    out = []
    for tok in (student_tok, teacher_tok):
        ids, starts, ends = encode_with_offsets(tok, text)
        eos = end_token_id(tok)
        if eos is not None:
            ids = np.append(ids, eos)
            starts = np.append(starts, len(text))
            ends = np.append(ends, len(text) + 1)
        out.append((ids, starts + base, ends + base))
    return tuple(out)


def _build_store(documents: Iterator[Any], student_tok: Any, teacher_tok: Any, directory: Path, *,
                 eval_fraction: float, max_documents: int | None, max_tokens: int | None,
                 min_eval_tokens: int) -> dict[str, dict[str, _Side]]:
    """Tokenize every document with both tokenizers into per-split arrays saved under ``directory``."""
    from entrenar_cli.data import ensure_cache_dir, is_heldout
    from entrenar_cli.fsutil import write_json_atomic

    parts: dict[str, dict[str, list[list[np.ndarray]]]] = {
        split: {side: [[], [], []] for side in ("student", "teacher")} for split in ("train", "eval")}
    base = {"train": 0, "eval": 0}
    count = {"train": 0, "eval": 0}
    docs = {"train": 0, "eval": 0}
    texts_train: list[str] = []
    n_docs = 0
    for doc in documents:
        if max_documents is not None and n_docs >= max_documents:
            break
        if max_tokens is not None and count["train"] >= max_tokens:
            break
        if doc.text is None:
            continue
        split = "eval" if is_heldout(doc.key, eval_fraction) else "train"
        s, t = encode_pair(doc.text, student_tok, teacher_tok, base[split])
        if len(s[0]) == 0 or len(t[0]) == 0:
            continue
        n_docs += 1
        for side, arrays in (("student", s), ("teacher", t)):
            for k in range(3):
                parts[split][side][k].append(arrays[k])
        base[split] += len(doc.text) + 1
        count[split] += len(s[0])
        docs[split] += 1
        if split == "train":
            texts_train.append(doc.text)
    # as data.build_stores: a held-out split asked for but smaller than a block takes the last document
    if eval_fraction > 0 and count["eval"] < min_eval_tokens and docs["train"] > 1:
        text = texts_train[-1]
        for side in ("student", "teacher"):
            for k in range(3):
                parts["train"][side][k].pop()
        s, t = encode_pair(text, student_tok, teacher_tok, base["eval"])
        for side, arrays in (("student", s), ("teacher", t)):
            for k in range(3):
                parts["eval"][side][k].append(arrays[k])
        docs["train"] -= 1
        docs["eval"] += 1
    if docs["train"] == 0:
        raise DataError("the dataset has no usable text" if docs["eval"] == 0 else
                        f"all {docs['eval']} documents fell into the held-out split",
                        hint="check dataset.path / text_column, or lower dataset.eval_fraction")
    ensure_cache_dir(directory)
    stores: dict[str, dict[str, _Side]] = {}
    for split in ("train", "eval"):
        stores[split] = {}
        for side in ("student", "teacher"):
            ids, starts, ends = (np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts[split][side])
            np.save(directory / f"{split}.{side}.ids.npy", ids.astype(np.uint32))
            np.save(directory / f"{split}.{side}.starts.npy", starts.astype(np.int64))
            np.save(directory / f"{split}.{side}.ends.npy", ends.astype(np.int64))
            stores[split][side] = _Side(ids.astype(np.uint32), starts, ends)
    write_json_atomic(directory / "manifest.json", {"version": STORE_VERSION, "documents": docs})
    return stores


def _open_store(directory: Path) -> dict[str, dict[str, _Side]] | None:
    try:
        info = json.loads((directory / "manifest.json").read_text())
        if info.get("version") != STORE_VERSION:
            return None
        return {split: {side: _Side(*(np.load(directory / f"{split}.{side}.{part}.npy", mmap_mode="r")
                                      for part in ("ids", "starts", "ends")))
                        for side in ("student", "teacher")} for split in ("train", "eval")}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: rebuilt


def load_cross_blocks(settings: Any, student_tok: Any, teacher_tok: Any, *,
                      teacher_max_positions: int | None = None) -> tuple[CrossBlockDataset, CrossBlockDataset]:
    """Train and held-out student blocks with the teacher's tokenization of the same text.

    The held-out split is by document, as for same-tokenizer runs; both tokenizations are cached
    on disk keyed by the files, both tokenizers and the settings.
    """
    from entrenar_cli.data import cache_root, dataset_files, files_fingerprint, iter_documents, tokenizer_fingerprint

    files = dataset_files(settings)
    length = settings.max_length
    max_tokens = (settings.max_blocks + 1) * (length + 1) if settings.max_blocks else None
    meta = {"files": files_fingerprint(files), "student": tokenizer_fingerprint(student_tok),
            "teacher": tokenizer_fingerprint(teacher_tok), "eval_fraction": settings.eval_fraction,
            "column": settings.text_column, "format": settings.format, "max_documents": settings.max_documents,
            "min_eval_tokens": length + 1, "max_tokens": max_tokens, "version": STORE_VERSION}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
    directory = cache_root() / "cross-tokens" / key
    stores = _open_store(directory)
    if stores is None:
        docs = iter_documents(files, fmt=settings.format, text_column=settings.text_column)
        stores = _build_store(docs, student_tok, teacher_tok, directory, eval_fraction=settings.eval_fraction,
                              max_documents=settings.max_documents, max_tokens=max_tokens,
                              min_eval_tokens=length + 1)

    def blocks(split: str, max_blocks: int | None) -> CrossBlockDataset:
        s, t = stores[split]["student"], stores[split]["teacher"]
        return CrossBlockDataset(TokenStore(s.ids, None, 0), length, True, max_blocks=max_blocks, student_side=s,
                                 teacher_side=t, teacher_max_positions=teacher_max_positions,
                                 register=(split == "eval"))

    train, held = blocks("train", settings.max_blocks), blocks("eval", None)
    if len(train) == 0:
        raise DataError(f"the dataset has {len(stores['train']['student'].ids)} training tokens: "
                        f"not enough for one block of max_length {length}", hint="add data or lower dataset.max_length")
    if settings.eval_fraction > 0 and len(held) == 0:
        from entrenar_cli.console import warn

        warn(f"the held-out split has {len(stores['eval']['student'].ids)} tokens, less than one block of {length}: "
             "no held-out evaluation (raise dataset.eval_fraction or add documents)")
    return train, held


# ---- the vocab doctor ----------------------------------------------------------------------------


def vocab_doctor(teacher_tok: Any, student_tok: Any, shared: SharedVocab, blocks: CrossBlockDataset,
                 sample: int = DOCTOR_SAMPLE_BLOCKS) -> dict[str, Any]:
    """What the two vocabularies share and how well a data sample aligns (the plan prints it).

    ``shared_mass``: the share of the sample's teacher tokens whose key the student also has, the
    measure ``method: auto`` decides by. ``coverage``: the share of student positions that have an
    aligned teacher position (the positions the logit loss sees).
    """
    n = len(blocks)
    picks = sorted({round(i * (n - 1) / max(1, sample - 1)) for i in range(min(sample, n))}) if n else []
    aligned = total = t_tokens = t_shared = 0
    for i in picks:
        view = blocks.teacher_view(i)
        aligned += len(view.s_pred)
        total += blocks.length
        t_tokens += len(view.ids)
        t_shared += int((shared.teacher_key[np.clip(view.ids, 0, len(shared.teacher_key) - 1)] >= 0).sum())
    t_with = int((shared.teacher_key >= 0).sum())
    s_with = int((shared.student_key >= 0).sum())
    return {
        "teacher_vocab": len(teacher_tok), "student_vocab": len(student_tok),
        "teacher_scheme": _scheme(teacher_tok)[0], "student_scheme": _scheme(student_tok)[0],
        "shared_keys": shared.size, "teacher_tokens_shared": t_with, "student_tokens_shared": s_with,
        "teacher_tokens_by_prefix": shared.prefix_mapped,
        "teacher_overlap": t_with / max(1, len(teacher_tok)), "student_overlap": s_with / max(1, len(student_tok)),
        "sample_blocks": len(picks), "coverage": aligned / max(1, total),
        "teacher_tokens_per_student_token": t_tokens / max(1, total), "shared_mass": t_shared / max(1, t_tokens),
    }


def choose_method(requested: str, doctor: dict[str, Any]) -> tuple[str, str]:
    """(method, why): ``auto`` takes the hybrid when most of the sample's teacher tokens are shared."""
    if requested != "auto":
        return requested, "set in distillation.cross_tokenizer.method"
    share = doctor["shared_mass"]
    if share >= AUTO_GOLD_MIN_SHARED:
        return "gold", f"auto: {100 * share:.0f}% of the sample's teacher tokens have a student counterpart"
    return "uld", f"auto: only {100 * share:.0f}% of the sample's teacher tokens have a student counterpart"


def doctor_lines(doctor: dict[str, Any], method: str, why: str) -> list[str]:
    """The vocab doctor's report as plan lines."""
    d = doctor
    return [
        f"tokenizers differ: cross-tokenizer distillation, logit loss {method.upper()} ({why})",
        f"vocab doctor: teacher {d['teacher_vocab']:,} tokens ({d['teacher_scheme']}), student "
        f"{d['student_vocab']:,} ({d['student_scheme']}); {d['shared_keys']:,} token strings shared after "
        f"normalising markers ({100 * d['teacher_overlap']:.1f}% of the teacher's vocabulary, "
        f"{100 * d['student_overlap']:.1f}% of the student's; {d.get('teacher_tokens_by_prefix', 0):,} teacher "
        "tokens counted by the student's first token of their text)",
        f"vocab doctor: on {d['sample_blocks']} training blocks {100 * d['coverage']:.1f}% of student positions align "
        f"with a teacher position; {100 * d['shared_mass']:.1f}% of teacher tokens have a student counterpart; "
        f"{d['teacher_tokens_per_student_token']:.2f} teacher tokens per student token",
    ]


def check_settings(cfg: Any, task: str, student_task: str) -> None:
    """Refuse what cross-tokenizer distillation cannot do, each with one message (exit code 2)."""
    dist = cfg.distillation
    if dist.teacher_cache.enabled:
        raise ConfigError(
            "distillation.teacher_cache is not supported when the teacher's and student's tokenizers differ: the "
            "cache stores the teacher's top-k logits per student token, and across tokenizers there is no such "
            "pairing to store",
            hint="turn distillation.teacher_cache off (the teacher runs alongside the student)",
        )
    if task != "causal" or student_task not in ("causal", "base"):
        raise ConfigError(
            f"tokenizers differ and the teacher is a {task} model: cross-tokenizer distillation supports causal "
            "language models (text read left to right by both, aligned by characters)",
            hint="use a student with the teacher's tokenizer for encoders",
        )
    if dist.kd_loss != "forward_kl":
        raise ConfigError(
            f"distillation.kd_loss: {dist.kd_loss} needs one shared vocabulary; across tokenizers the logit loss is "
            "distillation.cross_tokenizer.method (uld, gold or auto)",
            hint="remove distillation.kd_loss",
        )


# ---- losses --------------------------------------------------------------------------------------


def uld_distance(p_student: Any, p_teacher: Any, top_k: int = 0) -> Any:
    """Per row, ``sum_i |sort(p_s)_i - sort(p_t)_i|`` with both sorted decreasingly and the shorter
    padded with zeros (Boizard et al. 2024). ``[n, V_s]``, ``[n, V_t]`` -> ``[n]``.

    Padding with zeros is the same as comparing only the first ``min(V_s, V_t)`` ranks and adding the
    longer side's remaining mass, which is how it is computed (no padded copy). ``top_k`` > 0 compares
    the first ``top_k`` ranks and the two remaining masses as one bucket: a lower bound of the exact
    distance, equal to it when the mass beyond rank ``top_k`` agrees, and 5-20x cheaper than sorting a
    49k vocabulary (``torch.topk`` is a partial selection).
    """
    import torch

    k = min(p_student.shape[-1], p_teacher.shape[-1])
    if 0 < top_k < k:
        s = torch.topk(p_student, top_k, dim=-1).values
        t = torch.topk(p_teacher, top_k, dim=-1).values
        tail_s = (p_student.sum(-1) - s.sum(-1)).clamp_min(0)
        tail_t = (p_teacher.sum(-1) - t.sum(-1)).clamp_min(0)
        return (s - t).abs().sum(-1) + (tail_s - tail_t).abs()
    s = torch.sort(p_student, dim=-1, descending=True).values
    t = torch.sort(p_teacher, dim=-1, descending=True).values
    dist = (s[:, :k] - t[:, :k]).abs().sum(-1)
    return dist + s[:, k:].sum(-1) + t[:, k:].sum(-1)


def hybrid_distance(s_logp: Any, t_logp: Any, s_key: Any, t_key: Any, n_keys: int, uld_weight: float = 1.0,
                    top_k: int = 0) -> Any:
    """GOLD-style per row: forward KL from the teacher's distribution over the keys the student can
    express (its mass on unkeyed tokens set aside and the rest renormalised) to the student's
    distribution coarsened to the same keys plus one bucket for its unkeyed tokens; plus
    ``uld_weight`` x the teacher's unkeyed mass x ULD between the *shapes* of the two sides'
    unkeyed tokens (each normalised to sum 1).

    ``s_key``/``t_key``: per token id the shared key's index or -1 (:class:`SharedVocab`). Mass is
    summed per key on each side (an uncased student's ``the`` against the teacher's ``the`` + ``The``).
    The teacher's unkeyed mass is what the student cannot say (whitespace its tokenizer drops, byte
    fragments): as a target it would teach the student to put that much mass on its own unkeyed
    tokens ([UNK], unused ids), probability the right next token then lacks. The student's bucket
    stays in the KL, so the divergence is >= 0 and 0 only when the student puts nothing there and
    matches the teacher's conditional.
    """
    import torch

    n = s_logp.shape[0]
    p_s, p_t = s_logp.exp(), t_logp.exp()
    s_in, t_in = s_key >= 0, t_key >= 0
    q_s = p_s.new_zeros((n, n_keys + 1)).index_add_(1, s_key[s_in], p_s[:, s_in])
    q_t = p_t.new_zeros((n, n_keys)).index_add_(1, t_key[t_in], p_t[:, t_in])
    rest_s, rest_t = p_s[:, ~s_in], p_t[:, ~t_in]
    q_s[:, n_keys] = rest_s.sum(-1)
    q_t = q_t / q_t.sum(-1, keepdim=True).clamp_min(1e-30)
    kl = torch.where(q_t > 0, q_t * (torch.log(q_t.clamp_min(1e-30)) - torch.log(q_s[:, :n_keys].clamp_min(1e-30))),
                     torch.zeros_like(q_t)).sum(-1)
    if uld_weight <= 0 or rest_s.shape[-1] == 0 or rest_t.shape[-1] == 0:
        return kl
    t_rest = rest_t.sum(-1)
    shape_s = rest_s / rest_s.sum(-1, keepdim=True).clamp_min(1e-30)
    shape_t = rest_t / t_rest.unsqueeze(-1).clamp_min(1e-30)
    return kl + uld_weight * t_rest * uld_distance(shape_s, shape_t, top_k)


def cross_divergence(s_logits: Any, t_logits: Any, method: str, shared: Any, temperature: float = 1.0,
                     uld_weight: float = 1.0, chunk_rows: int = CHUNK_ROWS, top_k: int = 0) -> Any:
    """Sum over rows of ``T^2 x`` the method's distance between aligned student and teacher logits.

    ``shared``: (student key tensor, teacher key tensor, number of keys), for ``gold``. Computed in
    fp32, a chunk of rows at a time (sorting a row copies the vocabulary twice).
    """
    import torch
    import torch.nn.functional as F

    total = s_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, s_logits.shape[0], chunk_rows):
        s = F.log_softmax(s_logits[start:start + chunk_rows].float() / temperature, dim=-1)
        t = F.log_softmax(t_logits[start:start + chunk_rows].float() / temperature, dim=-1)
        if method == "uld":
            d = uld_distance(s.exp(), t.exp(), top_k)
        else:
            s_key, t_key, n_keys = shared
            d = hybrid_distance(s, t, s_key, t_key, n_keys, uld_weight, top_k)
        total = total + (temperature ** 2) * d.sum()
    return total


def pool_matrix(span_of_token: Any, n_spans: int) -> Any:
    """``[b, K, L]`` mean-pooling weights from per-token span ids ``[b, L]`` (-1: in no span)."""
    import torch

    b, length = span_of_token.shape
    onehot = torch.zeros((b, n_spans + 1, length), dtype=torch.float32, device=span_of_token.device)
    onehot.scatter_(1, (span_of_token + 1).clamp_min(0).unsqueeze(1), 1.0)
    onehot = onehot[:, 1:]
    return onehot / onehot.sum(-1, keepdim=True).clamp_min(1.0)


def pooled_attention(attn: Any, pool: Any) -> Any:
    """Span-to-span attention ``[b, 1, K, K]``: mean over a span's queries of the attention summed
    over a span's keys (heads averaged first)."""
    a = attn.float().mean(1)
    return (pool @ a @ (pool > 0).float().transpose(1, 2)).unsqueeze(1)



# ---- the pipeline's entry point ------------------------------------------------------------------


@dataclass
class CrossSetup:
    """What a cross-tokenizer run adds to the distillation setup."""

    teacher_tokenizer: Any
    shared: SharedVocab
    train_blocks: CrossBlockDataset
    eval_blocks: CrossBlockDataset
    doctor: dict[str, Any]
    method: str
    why: str

    def plan(self) -> dict[str, Any]:
        return {**self.doctor, "method": self.method, "method_reason": self.why}


def tokenizers_differ(teacher_tok: Any, student_tok: Any) -> bool:
    """Whether the two tokenizers give different ids to any token (the same fingerprint as the data cache)."""
    from entrenar_cli.data import tokenizer_fingerprint

    return tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok)


def prepare(cfg: Any, teacher_tok: Any, student_tok: Any, *, task: str, student_task: str,
            teacher_max_positions: int | None) -> CrossSetup:
    """Check the run, read the data with both tokenizers, run the vocab doctor and pick the method."""
    check_settings(cfg, task, student_task)
    require_offsets(teacher_tok, "teacher")
    require_offsets(student_tok, "student")
    train, held = load_cross_blocks(cfg.dataset, student_tok, teacher_tok, teacher_max_positions=teacher_max_positions)
    shared = shared_vocab(teacher_tok, student_tok)
    doctor = vocab_doctor(teacher_tok, student_tok, shared, train)
    method, why = choose_method(cfg.distillation.cross_tokenizer.method, doctor)
    return CrossSetup(teacher_tok, shared, train, held, doctor, method, why)


def build_objective(cross: CrossSetup, teacher: Any, student: Any, settings: Any) -> Any:
    """The :class:`entrenar_cli.cross_objective.CrossTokenizerObjective` of a run."""
    from entrenar_cli import models
    from entrenar_cli.cross_objective import CrossTokenizerObjective

    pad = cross.teacher_tokenizer.pad_token_id
    return CrossTokenizerObjective(
        teacher, settings, method=cross.method, shared=cross.shared, train_blocks=cross.train_blocks,
        eval_blocks=cross.eval_blocks, student_dim=models.hidden_size(student), teacher_dim=models.hidden_size(teacher),
        teacher_pad_id=pad if pad is not None else 0, student_vocab=models.vocab_of(student),
        teacher_vocab=models.vocab_of(teacher),
    )
